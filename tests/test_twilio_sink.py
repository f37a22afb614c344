"""The Twilio sink, driven over real HTTP on 127.0.0.1 by the real twilio-python async client."""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from bot.demo.loopback import LoopbackServer
from bot.demo.twilio_sink import TwilioSink, mask_address

SID = "AC" + "0" * 31 + "1"
TOKEN = "sink-test-token"
BOT = "whatsapp:+14155238886"
USER = "whatsapp:+15551234567"
OTHER = "whatsapp:+447700900123"


class CallbackReceiver:
    """A stand-in for the bot's status-callback endpoint: records every callback it gets."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.received: list[dict[str, Any]] = []
        self.app = FastAPI()

        @self.app.post("/status")
        async def status(request: Request) -> Response:
            form = await request.form()
            with self._changed:
                self.received.append(
                    {
                        "params": {k: str(v) for k, v in form.items()},
                        "signature": request.headers.get("x-twilio-signature", ""),
                    }
                )
                self._changed.notify_all()
            return Response(status_code=204)

    def wait_for(self, n: int, sid: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        def matching() -> list[dict[str, Any]]:
            return [c for c in self.received if c["params"].get("MessageSid") == sid]

        with self._changed:
            if not self._changed.wait_for(lambda: len(matching()) >= n, timeout):
                raise TimeoutError(f"expected {n} callbacks for {sid}, got {matching()!r}")
            return list(matching())


@pytest.fixture(scope="module")
def sink_server() -> Iterator[tuple[TwilioSink, str]]:
    sink = TwilioSink(account_sid=SID, auth_token=TOKEN)
    with LoopbackServer(sink.app, name="twilio-sink") as server:
        yield sink, server.url


@pytest.fixture(scope="module")
def receiver_server() -> Iterator[tuple[CallbackReceiver, str]]:
    receiver = CallbackReceiver()
    with LoopbackServer(receiver.app, name="callback-receiver") as server:
        yield receiver, server.url + "/status"


@pytest.fixture
def sink(sink_server: tuple[TwilioSink, str]) -> TwilioSink:
    sink_server[0].clear()
    sink_server[0].clear_faults()
    return sink_server[0]


def make_client(url: str, *, sid: str = SID, token: str = TOKEN) -> Client:
    client = Client(sid, token, http_client=AsyncTwilioHttpClient())
    # Domains build absolute URLs from their base_url at request time, so this reroutes Messages calls.
    client.api.base_url = url
    client.messaging.base_url = url
    return client


@pytest.fixture
async def client(sink_server: tuple[TwilioSink, str]) -> AsyncIterator[Client]:
    client = make_client(sink_server[1])
    yield client
    await client.http_client.close()


async def test_create_message_returns_a_parsed_message_instance(sink: TwilioSink, client: Client) -> None:
    message = await client.messages.create_async(to=USER, from_=BOT, body="Hello from the bot")
    assert message.sid and message.sid.startswith("SM") and len(message.sid) == 34
    assert (message.to, message.from_, message.body) == (USER, BOT, "Hello from the bot")
    assert (message.status, message.direction, message.api_version) == ("queued", "outbound-api", "2010-04-01")
    assert message.account_sid == SID and message.num_segments == "1" and message.num_media == "0"
    assert isinstance(message.date_created, datetime) and message.date_sent is None
    assert message.error_code is None and message.price_unit == "USD"
    assert message.uri == f"/2010-04-01/Accounts/{SID}/Messages/{message.sid}.json"

    [recorded] = sink.wait_for_messages(1, to=USER, timeout=1.0)
    assert recorded["sid"] == message.sid and recorded["body"] == "Hello from the bot"
    assert recorded["from"] == BOT and recorded["status_callback"] is None
    assert recorded["at"] <= time.monotonic()
    assert sink.messages(to=OTHER) == []


async def test_wrong_credentials_are_401(sink: TwilioSink, sink_server: tuple[TwilioSink, str]) -> None:
    for sid, token in ((SID, "wrong"), ("AC" + "f" * 32, TOKEN)):
        bad = make_client(sink_server[1], sid=sid, token=token)
        try:
            with pytest.raises(TwilioRestException) as refused:
                await bad.messages.create_async(to=USER, from_=BOT, body="nope")
        finally:
            await bad.http_client.close()
        assert (refused.value.status, refused.value.code) == (401, 20003)
    assert sink.messages() == []
    assert [a["status"] for a in sink.attempts()] == [401, 401]


async def test_invalid_messages_are_400(sink: TwilioSink, client: Client) -> None:
    with pytest.raises(TwilioRestException) as too_long:
        await client.messages.create_async(to=USER, from_=BOT, body="x" * 1601)
    assert (too_long.value.status, too_long.value.code) == (400, 21617)
    with pytest.raises(TwilioRestException) as no_body:
        await client.messages.create_async(to=USER, from_=BOT)
    assert no_body.value.code == 21602
    ok = await client.messages.create_async(to=USER, from_=BOT, body="y" * 1600)
    assert ok.num_segments == "11"


@pytest.mark.parametrize(
    ("status", "code", "expected_code"),
    [(500, None, 20500), (503, None, 20500), (429, None, 20429), (400, 63016, 63016)],
)
async def test_injected_errors(
    sink: TwilioSink, client: Client, status: int, code: int | None, expected_code: int
) -> None:
    sink.inject(status=status, code=code)
    with pytest.raises(TwilioRestException) as failed:
        await client.messages.create_async(to=USER, from_=BOT, body="first")
    assert (failed.value.status, failed.value.code) == (status, expected_code)
    # One fault, one request: the next one goes through.
    await client.messages.create_async(to=USER, from_=BOT, body="second")
    assert [m["body"] for m in sink.messages()] == ["second"]
    assert [(a["status"], a["outcome"]) for a in sink.attempts()] == [(status, "error"), (201, "accepted")]


async def test_faults_are_fifo_counted_and_filtered_by_recipient(
    sink: TwilioSink, client: Client, sink_server: tuple[TwilioSink, str]
) -> None:
    sink.inject(status=500, count=2, to=OTHER)
    sink.inject(status=429, retry_after=3)
    with pytest.raises(TwilioRestException) as rate_limited:
        await client.messages.create_async(to=USER, from_=BOT, body="skips the OTHER fault")
    assert rate_limited.value.status == 429
    assert [a["status"] for a in sink.attempts()] == [429]
    for _ in range(2):
        with pytest.raises(TwilioRestException) as failed:
            await client.messages.create_async(to=OTHER, from_=BOT, body="x")
        assert failed.value.status == 500
    await client.messages.create_async(to=OTHER, from_=BOT, body="through")
    assert [a["status"] for a in sink.attempts()] == [429, 500, 500, 201]

    # Retry-After is sent with an injected 429 (the SDK exception does not expose headers).
    sink.inject(status=429, retry_after=1.5)
    async with aiohttp.ClientSession() as http:
        reply = await http.post(
            f"{sink_server[1]}/2010-04-01/Accounts/{SID}/Messages.json",
            data={"To": USER, "From": BOT, "Body": "x"},
            headers={"Authorization": "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()},
        )
        assert reply.status == 429 and reply.headers["Retry-After"] == "1.5"
        assert (await reply.json())["more_info"] == "https://www.twilio.com/docs/errors/20429"


async def test_delay_injection(sink: TwilioSink, client: Client) -> None:
    sink.inject(status=201, delay=0.3)
    started = time.monotonic()
    message = await client.messages.create_async(to=USER, from_=BOT, body="late")
    assert time.monotonic() - started >= 0.3 and message.status == "queued"

    sink.inject(status=500, delay=0.2)
    started = time.monotonic()
    with pytest.raises(TwilioRestException):
        await client.messages.create_async(to=USER, from_=BOT, body="late and failed")
    assert time.monotonic() - started >= 0.2


async def test_reset_is_an_unwrapped_network_error(sink: TwilioSink, client: Client) -> None:
    sink.inject(reset=True)
    with pytest.raises(aiohttp.ClientError):
        await client.messages.create_async(to=USER, from_=BOT, body="dropped")
    assert [(a["status"], a["outcome"]) for a in sink.attempts()] == [(None, "reset")]
    assert sink.messages() == []


async def test_status_callbacks_are_signed_and_in_order(
    sink: TwilioSink, client: Client, receiver_server: tuple[CallbackReceiver, str]
) -> None:
    receiver, callback_url = receiver_server
    message = await client.messages.create_async(to=USER, from_=BOT, body="track me", status_callback=callback_url)
    callbacks = await asyncio.to_thread(receiver.wait_for, 2, message.sid)
    assert [c["params"]["MessageStatus"] for c in callbacks] == ["sent", "delivered"]
    validator = RequestValidator(TOKEN)
    for callback in callbacks:
        params = callback["params"]
        assert validator.validate(callback_url, params, callback["signature"])
        assert not RequestValidator("other-token").validate(callback_url, params, callback["signature"])
        assert params["SmsSid"] == message.sid and params["SmsStatus"] == params["MessageStatus"]
        assert (params["AccountSid"], params["From"], params["To"]) == (SID, BOT, USER)
        assert (params["ChannelPrefix"], params["ApiVersion"]) == ("whatsapp", "2010-04-01")
        assert "ErrorCode" not in params
    assert sink.messages()[0]["status_callback"] == callback_url


@pytest.mark.parametrize(("status", "expected"), [("undelivered", ["sent", "undelivered"]), ("failed", ["failed"])])
async def test_fail_delivery_reports_the_error_by_callback(
    sink: TwilioSink,
    client: Client,
    receiver_server: tuple[CallbackReceiver, str],
    status: str,
    expected: list[str],
) -> None:
    receiver, callback_url = receiver_server
    sink.fail_delivery(to=USER, status=status)
    message = await client.messages.create_async(
        to=USER, from_=BOT, body="outside the 24h window", status_callback=callback_url
    )
    assert message.status == "queued"
    callbacks = await asyncio.to_thread(receiver.wait_for, len(expected), message.sid)
    assert [c["params"]["MessageStatus"] for c in callbacks] == expected
    assert callbacks[-1]["params"]["ErrorCode"] == "63016"
    assert RequestValidator(TOKEN).validate(callback_url, callbacks[-1]["params"], callbacks[-1]["signature"])


async def test_callbacks_can_be_disabled(receiver_server: tuple[CallbackReceiver, str]) -> None:
    receiver, callback_url = receiver_server
    quiet = TwilioSink(account_sid=SID, auth_token=TOKEN, status_callbacks=False)
    with LoopbackServer(quiet.app, name="quiet-sink") as server:
        client = make_client(server.url)
        try:
            message = await client.messages.create_async(
                to=USER, from_=BOT, body="silent", status_callback=callback_url
            )
        finally:
            await client.http_client.close()
    # The server has stopped, so no callback task can still be running.
    assert [c for c in receiver.received if c["params"].get("MessageSid") == message.sid] == []


async def test_log_line_masks_the_number(sink: TwilioSink, client: Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wabot.demo.sink")
    await client.messages.create_async(to=USER, from_=BOT, body="secret-free body")
    lines = [r.getMessage() for r in caplog.records if r.name == "wabot.demo.sink"]
    assert lines == ["sink: message to whatsapp:+1•••••4567: secret-free body"]
    assert "5551234567" not in caplog.text and "555123" not in caplog.text


def test_mask_address() -> None:
    assert mask_address("whatsapp:+15551234567") == "whatsapp:+1•••••4567"
    assert mask_address("+447700900123") == "+4•••••0123"
    assert mask_address("whatsapp:+1234") == "whatsapp:+•••••"


async def test_wait_for_messages_timeout_is_helpful(sink: TwilioSink, client: Client) -> None:
    await client.messages.create_async(to=OTHER, from_=BOT, body="elsewhere")
    with pytest.raises(TimeoutError) as timed_out:
        sink.wait_for_messages(1, to=USER, timeout=0.05)
    text = str(timed_out.value)
    assert "whatsapp:+1•••••4567" in text and "1 message(s) to other recipients" in text
    assert "5551234567" not in text


async def test_http_inspection_endpoints(sink: TwilioSink, client: Client, sink_server: tuple[TwilioSink, str]) -> None:
    await client.messages.create_async(to=USER, from_=BOT, body="inspect me")
    async with aiohttp.ClientSession(base_url=sink_server[1]) as http:
        listed = await (await http.get("/_sink/messages")).json()
        assert [m["body"] for m in listed] == ["inspect me"]
        filtered = await (await http.get("/_sink/messages", params={"to": OTHER})).json()
        assert filtered == []
        assert (await http.delete("/_sink/messages")).status == 204
    assert sink.messages() == []


async def test_typing_indicator(sink: TwilioSink, client: Client) -> None:
    indicator = await client.messaging.v2.typing_indicator.create_async(channel="whatsapp", message_id="SM" + "a" * 32)
    assert indicator.success is True
    assert [(t["channel"], t["message_id"]) for t in sink.typing_indicators()] == [("whatsapp", "SM" + "a" * 32)]
