"""What reaches the webhook: only signed, well-formed Twilio requests are answered; the rest get a clear 4xx,
a `webhook_rejected` log event and a rejection metric, and never a model call."""

from __future__ import annotations

import concurrent.futures
import json
import socket
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode
from xml.etree import ElementTree

import pytest
from pydantic import SecretStr
from twilio.request_validator import RequestValidator

from bot.settings import DEFAULT_HOLDING_MESSAGE
from tests.conftest import ACCOUNT_SID, Bot, Posted, metric, new_sid

REJECTIONS = "wabot_webhook_rejections_total"
STATUSES = "wabot_message_status_total"
SIGNATURE_SETTINGS = "X-Twilio-Webhooks-Signature-Settings"
SHARED_KEY = "shared-key-secret"


def expect_rejected(
    send: Callable[[], Posted], *, status: int, reason: str, sim: Any, log_lines: Any, path: str = "/whatsapp"
) -> Posted:
    """Send one request that must be refused: the status, one rejection counted, one log event, no model call."""
    before = metric(REJECTIONS, {"reason": reason})
    mark = log_lines.mark()
    posted = send()
    assert posted.status == status, posted.text
    assert posted.text.startswith(f"{reason}: ")
    assert metric(REJECTIONS, {"reason": reason}) == before + 1
    events = [e for e in log_lines.events(mark) if e["event"] == "webhook_rejected"]
    assert [(e["reason"], e["status_code"], e["path"]) for e in events] == [(reason, status, path)]
    assert sim.calls() == []
    return posted


def only_reply(posted: Posted) -> str:
    assert posted.status == 200, posted.text
    assert posted.headers["content-type"].startswith("application/xml")
    [reply] = posted.messages
    return reply


def is_empty_twiml(posted: Posted) -> bool:
    root = ElementTree.fromstring(posted.text)
    return root.tag == "Response" and len(root) == 0 and not (root.text or "").strip()


# ---------------------------------------------------------------------------------------------- signatures


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda bot, form: ("", form), id="missing-header"),
        pytest.param(lambda bot, form: ("bm90IGEgcmVhbCBzaWduYXR1cmU=", form), id="wrong-signature"),
        pytest.param(lambda bot, form: (bot.sign("/whatsapp", form, token="another-token"), form), id="other-token"),
        pytest.param(
            lambda bot, form: (bot.sign("/whatsapp", form), {**form, "Body": "transfer all my money"}),
            id="tampered-body",
        ),
    ],
)
def test_bad_signatures_are_refused_and_nothing_is_stored(
    bot: Bot, sim, sink, log_lines, forge: Callable[[Bot, dict[str, str]], tuple[str, dict[str, str]]]
) -> None:
    form = bot.form("hello, is this signed?")
    signature, sent = forge(bot, form)
    expect_rejected(
        lambda: bot.post_form(sent, signature=signature), status=403, reason="signature", sim=sim, log_lines=log_lines
    )
    # Nothing of the refused request was kept: the same MessageSid, validly signed, is answered normally.
    assert only_reply(bot.post_form(form)) == "[turn 1] hello, is this signed?"
    assert len(sim.calls()) == 1
    bot.wait_idle()
    assert sink.messages() == []


def test_valid_signature_is_answered(bot: Bot, sim) -> None:
    assert only_reply(bot.send("signed properly")) == "[turn 1] signed properly"
    assert len(sim.calls()) == 1


def test_behind_a_tls_proxy_the_public_url_is_what_counts(make_bot: Callable[..., Bot], sim, log_lines) -> None:
    bot = make_bot(public_url="https://bot.example.com")
    assert bot.url.startswith("http://127.0.0.1:")
    # Twilio signed https://bot.example.com/whatsapp; the request arrives at http://127.0.0.1:PORT/whatsapp.
    assert only_reply(bot.send("via the proxy")) == "[turn 1] via the proxy"
    assert len(sim.calls()) == 1
    sim.clear_calls()

    form = bot.form("signed for the internal URL")
    expect_rejected(
        lambda: bot.post_form(form, signature=bot.sign("/whatsapp", form, base=bot.url)),
        status=403,
        reason="signature",
        sim=sim,
        log_lines=log_lines,
    )

    # A query string is part of the signed URL.
    assert (
        only_reply(bot.post_form(bot.form("with a query", sender="+15550009101"), path="/whatsapp?x=1"))
        == "[turn 1] with a query"
    )
    sim.clear_calls()
    form = bot.form("query not signed")
    expect_rejected(
        lambda: bot.post_form(form, path="/whatsapp?x=1", signature=bot.sign("/whatsapp", form)),
        status=403,
        reason="signature",
        sim=sim,
        log_lines=log_lines,
    )


def _sha256_headers(key_secret: str, url: str, form: dict[str, str], algorithm: str = "HMAC_SHA256") -> dict[str, str]:
    return {
        SIGNATURE_SETTINGS: f"key=webhooks_sharedkey_x,algorithm={algorithm}",
        "X-Twilio-Signature": RequestValidator(key_secret).compute_signature(url, form, algorithm="HMAC_SHA256"),
    }


def test_hmac_sha256_shared_key_signatures(make_bot: Callable[..., Bot], sim, log_lines) -> None:
    bot = make_bot(twilio_signing_key=SecretStr(SHARED_KEY))
    url = f"{bot.url}/whatsapp"

    form = bot.form("signed with the shared key")
    posted = bot.post_form(form, signature="", headers=_sha256_headers(SHARED_KEY, url, form))
    assert only_reply(posted) == "[turn 1] signed with the shared key"
    sim.clear_calls()

    for secret in ("another-shared-key", "test-auth-token"):
        form = bot.form(f"signed with {secret}")
        expect_rejected(
            lambda form=form, secret=secret: bot.post_form(
                form, signature="", headers=_sha256_headers(secret, url, form)
            ),
            status=403,
            reason="signature",
            sim=sim,
            log_lines=log_lines,
        )

    # The algorithm name is case-insensitive (as in twilio's validator), and it always selects the shared key.
    form = bot.form("lower-case algorithm", sender="+15550009103")
    posted = bot.post_form(form, signature="", headers=_sha256_headers(SHARED_KEY, url, form, "hmac_sha256"))
    assert only_reply(posted) == "[turn 1] lower-case algorithm"
    sim.clear_calls()
    form = bot.form("lower-case algorithm, auth token")
    expect_rejected(
        lambda: bot.post_form(form, signature="", headers=_sha256_headers("test-auth-token", url, form, "hmac_sha256")),
        status=403,
        reason="signature",
        sim=sim,
        log_lines=log_lines,
    )

    # The Auth Token (HMAC-SHA1) scheme keeps working next to the shared key.
    assert only_reply(bot.send("classic signature", sender="+15550009102")) == "[turn 1] classic signature"


def _status_form(**fields: str) -> dict[str, str]:
    return {
        "MessageSid": new_sid(),
        "AccountSid": ACCOUNT_SID,
        "ChannelPrefix": "whatsapp",
        "To": "whatsapp:+15550001111",
        "From": "whatsapp:+14155238886",
        **fields,
    }


def test_status_callbacks_must_be_signed(bot: Bot, sim, log_lines) -> None:
    before = metric(STATUSES, {"status": "delivered", "error_code": ""})
    form = _status_form(MessageStatus="delivered")
    expect_rejected(
        lambda: bot.post_form(form, path="/whatsapp/status", signature=""),
        status=403,
        reason="signature",
        sim=sim,
        log_lines=log_lines,
        path="/whatsapp/status",
    )
    assert metric(STATUSES, {"status": "delivered", "error_code": ""}) == before


@pytest.mark.parametrize(
    ("fields", "labels"),
    [
        ({"MessageStatus": "delivered"}, {"status": "delivered", "error_code": ""}),
        ({"MessageStatus": "failed", "ErrorCode": "63016"}, {"status": "failed", "error_code": "63016"}),
        ({"MessageStatus": "undelivered", "ErrorCode": "63016\n"}, {"status": "undelivered", "error_code": "other"}),
        ({"MessageStatus": "brand_new_status"}, {"status": "other", "error_code": ""}),
    ],
)
def test_signed_status_callbacks_are_counted(bot: Bot, sim, fields: dict[str, str], labels: dict[str, str]) -> None:
    before = metric(STATUSES, labels)
    posted = bot.post_form(_status_form(**fields), path="/whatsapp/status")
    assert posted.status == 200
    assert posted.headers["content-type"].startswith("application/xml")
    assert is_empty_twiml(posted)
    assert metric(STATUSES, labels) == before + 1
    assert sim.calls() == []


def test_status_callback_without_status_is_malformed(bot: Bot, sim, log_lines) -> None:
    form = _status_form()
    expect_rejected(
        lambda: bot.post_form(form, path="/whatsapp/status"),
        status=400,
        reason="malformed",
        sim=sim,
        log_lines=log_lines,
        path="/whatsapp/status",
    )


# ---------------------------------------------------------------------------------------------- malformed


def _without(form: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in form.items() if k not in names}


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda form: _without(form, "From"), id="missing-from"),
        pytest.param(lambda form: _without(form, "MessageSid", "SmsMessageSid", "SmsSid"), id="missing-sid"),
        pytest.param(
            lambda form: {**form, "MessageSid": "SM123", "SmsMessageSid": "SM123", "SmsSid": "SM123"},
            id="sid-not-a-sid",
        ),
        pytest.param(
            lambda form: {**form, "MessageSid": f"{form['MessageSid']}\n", "SmsMessageSid": "", "SmsSid": ""},
            id="sid-with-trailing-newline",
        ),
        pytest.param(lambda form: {**form, "From": "whatsapp:alice"}, id="from-not-e164"),
        pytest.param(lambda form: {**form, "From": "whatsapp:+15550001111\n"}, id="from-with-trailing-newline"),
        pytest.param(lambda form: {**form, "From": "messenger:+15550001111"}, id="from-other-channel"),
        pytest.param(lambda form: {**form, "Body": "x" * 4097}, id="body-over-4096-chars"),
        pytest.param(lambda form: {**form, "NumMedia": "abc"}, id="num-media-not-a-number"),
    ],
)
def test_signed_but_malformed_messages_are_400(
    bot: Bot, sim, log_lines, mangle: Callable[[dict[str, str]], dict[str, str]]
) -> None:
    form = mangle(bot.form("malformed"))
    expect_rejected(lambda: bot.post_form(form), status=400, reason="malformed", sim=sim, log_lines=log_lines)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"MessageSid=SM" + b"a" * 32 + b"&From=whatsapp:+15550001111&Body=\xff\xfe\xc3", id="raw-bytes"),
        pytest.param(b"MessageSid=SM" + b"a" * 32 + b"&From=whatsapp:+15550001111&Body=%FF%FE", id="percent-bytes"),
    ],
)
def test_invalid_utf8_is_400(bot: Bot, sim, log_lines, raw: bytes) -> None:
    expect_rejected(
        lambda: bot.post_form(None, content=raw, signature="c2lnbmVkPw=="),
        status=400,
        reason="malformed",
        sim=sim,
        log_lines=log_lines,
    )


def test_json_is_415(bot: Bot, sim, log_lines) -> None:
    form = bot.form("as JSON")
    expect_rejected(
        lambda: bot.post_form(
            form,
            content=json.dumps(form).encode(),
            headers={"Content-Type": "application/json"},
        ),
        status=415,
        reason="malformed",
        sim=sim,
        log_lines=log_lines,
    )


def test_body_over_the_byte_limit_is_413_with_content_length(make_bot: Callable[..., Bot], sim, log_lines) -> None:
    bot = make_bot(max_body_bytes=2048)
    form = bot.form("y" * 3000)  # a valid, signed message; only its size is wrong
    expect_rejected(lambda: bot.post_form(form), status=413, reason="too_large", sim=sim, log_lines=log_lines)
    # Just under the limit is fine.
    assert only_reply(bot.send("z" * 1000)) == "[turn 1] " + "z" * 1000


def test_body_over_the_byte_limit_is_413_when_chunked(make_bot: Callable[..., Bot], sim, log_lines) -> None:
    bot = make_bot(max_body_bytes=2048)
    form = bot.form("y" * 3000)
    body = urlencode(form).encode()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 512):
            yield body[i : i + 512]

    def send() -> Posted:
        response = bot.client.post(
            f"{bot.url}/whatsapp",
            content=chunks(),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Twilio-Signature": bot.sign("/whatsapp", form),
            },
        )
        assert "content-length" not in {k.lower() for k in response.request.headers}
        assert response.request.headers["transfer-encoding"] == "chunked"
        return Posted(response.status_code, response.text, dict(response.headers), 0.0)

    expect_rejected(send, status=413, reason="too_large", sim=sim, log_lines=log_lines)


# ---------------------------------------------------------------------------------------------- accepted variants


def test_unknown_and_optional_fields_are_accepted(bot: Bot, sim) -> None:
    posted = bot.send(
        "an ad brought me here",
        ChannelMetadata=json.dumps({"type": "whatsapp", "data": {"context": {"ProfileName": "Test", "WaId": "1"}}}),
        ReferralNumMedia="0",
        ReferralBody="Try our bot",
        ReferralSourceUrl="https://fb.me/abc",
        ReferralSourceType="ad",
        ReferralCtwaClid="ARAkLkA8rmlFeiCktEJQ",
        Forwarded="true",
        FrequentlyForwarded="false",
        OriginalRepliedMessageSid=new_sid(),
        MessagingServiceSid="MG" + "2" * 32,
        NewTwilioField="something Twilio added last week",
    )
    assert only_reply(posted) == "[turn 1] an ad brought me here"
    assert len(sim.calls()) == 1


def test_specials_and_emoji_round_trip_exactly(bot: Bot, sim) -> None:
    text = "Ünïcødé 🎉 & <tag> +%20 = ?"
    posted = bot.send(text)
    assert only_reply(posted) == f"[turn 1] {text}"
    # Escaped correctly in the XML itself, not only after parsing.
    assert "&amp; &lt;tag&gt;" in posted.text
    assert "<tag>" not in posted.text


def test_empty_body_gets_a_sensible_reply(bot: Bot, sim) -> None:
    reply = only_reply(bot.send(""))
    assert reply.startswith("[turn 1] ")
    assert "empty message" in reply
    assert "empty message" in json.dumps(sim.calls()[0]["input"])


@pytest.fixture
def media_host() -> Iterator[socket.socket]:
    """A listening socket standing in for Twilio's media host: any fetch would show as a pending connection."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        yield server


def test_media_only_message_on_another_origin_is_not_fetched(bot: Bot, sim, sink, media_host: socket.socket) -> None:
    port = media_host.getsockname()[1]
    media_url = f"http://127.0.0.1:{port}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/MM1/Media/ME1"
    posted = bot.send("", NumMedia="1", MediaUrl0=media_url, MediaContentType0="image/jpeg")
    reply = only_reply(posted)
    # Not on the Twilio API origin: never fetched, and the user is told the photo could not be downloaded.
    assert reply == "⚠️ I couldn't download your photo. Please send it again."
    assert "empty message" not in reply
    assert media_url not in json.dumps(sim.calls())
    bot.wait_idle()
    with pytest.raises(BlockingIOError):
        media_host.accept()  # nobody connected to the media URL
    assert sink.messages() == []


def test_location_pin_names_the_coordinates(bot: Bot, sim) -> None:
    reply = only_reply(
        bot.send(
            "",
            Latitude="52.5163",
            Longitude="13.3777",
            Address="Pariser Platz, 10117 Berlin",
            Label="Brandenburg Gate",
            MessageType="location",
        )
    )
    assert "52.5163, 13.3777" in reply
    assert "Brandenburg Gate" in reply
    assert "Pariser Platz" in reply
    assert "empty message" not in reply


def test_button_reply_names_the_button(bot: Bot, sim) -> None:
    reply = only_reply(
        bot.send("Yes, book it", ButtonText="Yes, book it", ButtonPayload="BOOK_YES", MessageType="button")
    )
    assert "button" in reply
    assert "'Yes, book it'" in reply


# ---------------------------------------------------------------------------------------------- duplicates


def test_same_message_sid_twice_is_answered_once(bot: Bot, sim, log_lines) -> None:
    form = bot.form("only once please")
    assert only_reply(bot.post_form(form)) == "[turn 1] only once please"
    before = metric(REJECTIONS, {"reason": "duplicate"})
    mark = log_lines.mark()
    again = bot.post_form(form)
    assert again.status == 200
    assert again.headers["content-type"].startswith("application/xml")
    assert again.messages == []
    assert is_empty_twiml(again)
    assert metric(REJECTIONS, {"reason": "duplicate"}) == before + 1
    events = [e for e in log_lines.events(mark) if e["event"] == "webhook_rejected"]
    assert [(e["reason"], e["status_code"]) for e in events] == [("duplicate", 200)]
    assert len(sim.calls()) == 1


def test_duplicate_of_a_slow_message_gets_one_followup(bot: Bot, sim, sink) -> None:
    sender = "+15550009001"
    form = bot.form("slow one [sim:delay=1.5]", sender=sender)
    assert bot.post_form(form).messages == [DEFAULT_HOLDING_MESSAGE]
    assert is_empty_twiml(bot.post_form(form))  # the run is still in flight
    sink.wait_for_messages(1, to=f"whatsapp:{sender}", timeout=5)
    bot.wait_idle()
    assert [m["body"] for m in sink.messages(to=f"whatsapp:{sender}")] == ["[turn 1] slow one"]
    assert len(sim.calls()) == 1


def test_simultaneous_duplicates_race_to_one_answer(bot: Bot, sim, sink) -> None:
    sender = "+15550009002"
    form = bot.form("raced [sim:delay=1.2]", sender=sender)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: bot.post_form(form).messages, range(2)))
    assert sorted(results) == [[], [DEFAULT_HOLDING_MESSAGE]]
    sink.wait_for_messages(1, to=f"whatsapp:{sender}", timeout=5)
    bot.wait_idle()
    assert len(sink.messages(to=f"whatsapp:{sender}")) == 1
    assert len(sim.calls()) == 1


def test_same_idempotency_token_is_a_duplicate(bot: Bot, sim) -> None:
    token = "ID" + new_sid()
    headers = {"I-Twilio-Idempotency-Token": token}
    first = bot.post_form(bot.form("first delivery"), headers=headers)
    assert only_reply(first) == "[turn 1] first delivery"
    before = metric(REJECTIONS, {"reason": "duplicate"})
    second = bot.post_form(bot.form("first delivery"), headers=headers)  # a new MessageSid
    assert second.status == 200
    assert is_empty_twiml(second)
    assert metric(REJECTIONS, {"reason": "duplicate"}) == before + 1
    assert len(sim.calls()) == 1


# ---------------------------------------------------------------------------------------------- probes


def test_health_and_readiness(bot: Bot) -> None:
    health = bot.client.get(f"{bot.url}/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    ready = bot.client.get(f"{bot.url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
