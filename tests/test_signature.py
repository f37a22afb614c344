"""Checking Twilio's webhook signatures (bot/signature.py), without a bot around it.

Signatures are made here by Twilio's documented algorithm (the URL, then each field name and value in sorted
order, HMAC'd and base64'd), not by the validator the code uses, so a change of scheme in either shows up.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st
from starlette.datastructures import URL

from bot.signature import SignatureChecker

TOKEN = "auth-token-0123456789"
SHARED_KEY = "webhooks-shared-key-abcdef"
PUBLIC = "https://bot.example.com"
INTERNAL = URL("http://10.0.0.7:8000/whatsapp")
SHA256_SETTINGS = "key=webhooks_sharedkey_0123,algorithm=HMAC_SHA256"
FORM = [("Body", "Hello there"), ("From", "whatsapp:+15550001111"), ("MessageSid", "SM" + "0" * 32)]


def twilio_signature(
    secret: str, url: str, pairs: list[tuple[str, str]], digest: Callable[..., object] = hashlib.sha1
) -> str:
    """X-Twilio-Signature as Twilio computes it."""
    values: dict[str, set[str]] = {}
    for name, value in pairs:
        values.setdefault(name, set()).add(value)
    signed = url + "".join(name + value for name in sorted(values) for value in sorted(values[name]))
    return base64.b64encode(hmac.new(secret.encode(), signed.encode(), digest).digest()).decode()


def checker(public_url: str | None = PUBLIC, shared_key: str | None = SHARED_KEY) -> SignatureChecker:
    return SignatureChecker(TOKEN, public_url, shared_key)


def headers(signature: str, settings: str | None = None) -> dict[str, str]:
    out = {"x-twilio-signature": signature}
    if settings is not None:
        out["x-twilio-webhooks-signature-settings"] = settings
    return out


# --- the Auth Token scheme (HMAC-SHA1) ----------------------------------------------------------------------


def test_a_signature_over_the_public_url_is_valid_though_the_app_sees_another() -> None:
    signature = twilio_signature(TOKEN, f"{PUBLIC}/whatsapp", FORM)
    assert checker().is_valid(INTERNAL, FORM, headers(signature))


def test_a_signature_over_the_url_the_app_sees_is_not_when_a_public_url_is_set() -> None:
    signature = twilio_signature(TOKEN, str(INTERNAL), FORM)
    assert not checker().is_valid(INTERNAL, FORM, headers(signature))


def test_without_a_public_url_the_request_url_is_the_signed_one() -> None:
    signature = twilio_signature(TOKEN, str(INTERNAL), FORM)
    assert checker(public_url=None).is_valid(INTERNAL, FORM, headers(signature))


def test_the_query_string_is_signed_with_the_path() -> None:
    url = URL("http://10.0.0.7:8000/whatsapp?tenant=a&x=1")
    good = twilio_signature(TOKEN, f"{PUBLIC}/whatsapp?tenant=a&x=1", FORM)
    assert checker().is_valid(url, FORM, headers(good))
    without_query = twilio_signature(TOKEN, f"{PUBLIC}/whatsapp", FORM)
    assert not checker().is_valid(url, FORM, headers(without_query))
    other_path = twilio_signature(TOKEN, f"{PUBLIC}/other?tenant=a&x=1", FORM)
    assert not checker().is_valid(url, FORM, headers(other_path))


def test_the_default_port_may_be_in_the_signed_url_or_not() -> None:
    """Twilio signs some webhooks with :443 in the URL and some without; both are the same URL."""
    with_port = twilio_signature(TOKEN, "https://bot.example.com:443/whatsapp", FORM)
    assert checker().is_valid(INTERNAL, FORM, headers(with_port))
    assert checker("https://bot.example.com:443").is_valid(INTERNAL, FORM, headers(with_port))
    without = twilio_signature(TOKEN, f"{PUBLIC}/whatsapp", FORM)
    assert checker("https://bot.example.com:443").is_valid(INTERNAL, FORM, headers(without))
    other_port = twilio_signature(TOKEN, "https://bot.example.com:8443/whatsapp", FORM)
    assert not checker().is_valid(INTERNAL, FORM, headers(other_port))


def test_no_signature_or_a_wrong_one_is_invalid() -> None:
    assert not checker().is_valid(INTERNAL, FORM, {})
    assert not checker().is_valid(INTERNAL, FORM, headers(""))
    other_token = twilio_signature("another-token", f"{PUBLIC}/whatsapp", FORM)
    assert not checker().is_valid(INTERNAL, FORM, headers(other_token))


def test_every_field_is_signed_blanks_and_repeats_included() -> None:
    form = [*FORM, ("MediaUrl0", ""), ("ButtonText", "a"), ("ButtonText", "b")]
    signature = twilio_signature(TOKEN, f"{PUBLIC}/whatsapp", form)
    assert checker().is_valid(INTERNAL, form, headers(signature))
    assert not checker().is_valid(INTERNAL, form[:-1], headers(signature))  # a repeated value dropped
    assert not checker().is_valid(INTERNAL, [p for p in form if p[0] != "MediaUrl0"], headers(signature))
    assert not checker().is_valid(INTERNAL, [*form, ("Extra", "1")], headers(signature))


@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=12), st.text(max_size=40)),
        max_size=8,
    ),
    st.data(),
)
def test_any_form_signed_validates_and_any_changed_value_does_not(pairs: list[tuple[str, str]], data) -> None:
    signature = twilio_signature(TOKEN, f"{PUBLIC}/whatsapp", pairs)
    assert checker().is_valid(INTERNAL, pairs, headers(signature))
    if pairs:
        i = data.draw(st.integers(0, len(pairs) - 1))
        name, value = pairs[i]
        changed = value + data.draw(st.text(min_size=1, max_size=3))
        if all(v != changed for n, v in pairs if n == name):
            tampered = [*pairs[:i], (name, changed), *pairs[i + 1 :]]
            assert not checker().is_valid(INTERNAL, tampered, headers(signature))


# --- shared keys (HMAC-SHA256, announced by X-Twilio-Webhooks-Signature-Settings) ---------------------------


def test_a_sha256_signature_with_the_shared_key_is_valid() -> None:
    signature = twilio_signature(SHARED_KEY, f"{PUBLIC}/whatsapp", FORM, hashlib.sha256)
    assert checker().is_valid(INTERNAL, FORM, headers(signature, SHA256_SETTINGS))
    assert checker().is_valid(INTERNAL, FORM, headers(signature, SHA256_SETTINGS.lower()))


def test_a_sha256_signature_needs_the_header_and_the_shared_key() -> None:
    signature = twilio_signature(SHARED_KEY, f"{PUBLIC}/whatsapp", FORM, hashlib.sha256)
    assert not checker().is_valid(INTERNAL, FORM, headers(signature))  # no settings header: SHA1 expected
    with_token = twilio_signature(TOKEN, f"{PUBLIC}/whatsapp", FORM, hashlib.sha256)
    assert not checker().is_valid(INTERNAL, FORM, headers(with_token, SHA256_SETTINGS))
    sha1_with_key = twilio_signature(SHARED_KEY, f"{PUBLIC}/whatsapp", FORM)
    assert not checker().is_valid(INTERNAL, FORM, headers(sha1_with_key, SHA256_SETTINGS))


def test_the_sha1_scheme_keeps_the_auth_token_when_a_shared_key_is_set() -> None:
    signature = twilio_signature(TOKEN, f"{PUBLIC}/whatsapp", FORM)
    assert checker().is_valid(INTERNAL, FORM, headers(signature))
    with_key = twilio_signature(SHARED_KEY, f"{PUBLIC}/whatsapp", FORM)
    assert not checker().is_valid(INTERNAL, FORM, headers(with_key))


def test_without_a_shared_key_sha256_is_signed_with_the_auth_token() -> None:
    signature = twilio_signature(TOKEN, f"{PUBLIC}/whatsapp", FORM, hashlib.sha256)
    assert checker(shared_key=None).is_valid(INTERNAL, FORM, headers(signature, SHA256_SETTINGS))


def test_an_unknown_algorithm_is_refused() -> None:
    for digest in (hashlib.sha1, hashlib.sha256, hashlib.sha512):
        signature = twilio_signature(SHARED_KEY, f"{PUBLIC}/whatsapp", FORM, digest)
        assert not checker().is_valid(INTERNAL, FORM, headers(signature, "key=k,algorithm=HMAC_SHA512"))
