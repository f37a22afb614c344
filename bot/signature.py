"""Checking that a webhook really comes from Twilio: `X-Twilio-Signature` over the public URL and the form.

Signatures are computed against `WABOT_PUBLIC_URL` + path + query, not the URL the app sees, because behind a
TLS-terminating proxy the app sees `http://internal:8000/...` while Twilio signed `https://bot.example.com/...`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from starlette.datastructures import URL
from twilio.request_validator import HMAC_SHA256, RequestValidator, get_signature_algorithm


class SignatureChecker:
    """Validates both Twilio schemes: the Auth Token (HMAC-SHA1) and shared keys (HMAC-SHA256)."""

    def __init__(self, auth_token: str, public_url: str | None, shared_key: str | None = None) -> None:
        self._sha1 = RequestValidator(auth_token)
        self._sha256 = RequestValidator(shared_key or auth_token)
        self._public_url = public_url

    def signed_url(self, url: URL) -> str:
        """The URL Twilio called: the public base URL with this request's path and query."""
        if not self._public_url:
            return str(url)
        query = f"?{url.query}" if url.query else ""
        return f"{self._public_url}{url.path}{query}"

    def is_valid(self, url: URL, pairs: Iterable[tuple[str, str]], headers: Mapping[str, str]) -> bool:
        """True when the request carries a valid signature of either scheme for exactly these fields."""
        signature = headers.get("x-twilio-signature", "")
        if not signature:
            return False
        # Upper-cased as twilio's validator does, so the secret picked always matches the hash it computes.
        algorithm = get_signature_algorithm(headers.get("x-twilio-webhooks-signature-settings")).upper()
        validator = self._sha256 if algorithm == HMAC_SHA256 else self._sha1
        return bool(validator.validate(self.signed_url(url), MultiParams(pairs), signature, algorithm=algorithm))


class MultiParams(dict[str, list[str]]):
    """The form as the validator reads it (through `getall`): every value of every field, blanks included."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        super().__init__()
        for key, value in pairs:
            self.setdefault(key, []).append(value)

    def getall(self, name: str) -> list[str]:
        return self[name]
