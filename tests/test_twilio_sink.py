"""The Twilio sink, driven over real HTTP on 127.0.0.1 by the real twilio-python async client."""

from __future__ import annotations

import asyncio
import base64
import json
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
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from bot.demo.loopback import LoopbackServer
from bot.demo.twilio_sink import TwilioSink, mask_address
from tests import specs
from tests.waiting import until

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
        sink.api_url = server.url
        yield sink, server.url
    sink.shutdown()


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


async def test_message_taken_but_answered_late_is_listed_before_the_answer(sink: TwilioSink, client: Client) -> None:
    sink.inject(status=201, delay=1.0)
    pending = asyncio.create_task(client.messages.create_async(to=USER, from_=BOT, body="taken, answered late"))
    [taken] = await asyncio.to_thread(sink.wait_for_messages, 1, to=USER, timeout=5.0)
    [listed] = await client.messages.list_async(to=USER, from_=BOT, limit=20)
    assert not pending.done()  # Twilio has the message; its caller does not know yet
    assert (listed.sid, listed.body, listed.status) == (taken["sid"], "taken, answered late", "queued")
    assert (await pending).sid == taken["sid"]
    assert [(a["status"], a["outcome"]) for a in sink.attempts()] == [(201, "accepted")]


async def test_message_taken_then_connection_dropped(sink: TwilioSink, client: Client) -> None:
    sink.inject(status=201, reset=True)
    with pytest.raises(aiohttp.ClientError):
        await client.messages.create_async(to=USER, from_=BOT, body="taken, then dropped")
    [taken] = sink.messages(to=USER)
    assert [(a["status"], a["outcome"]) for a in sink.attempts()] == [(None, "accepted")]
    [listed] = await client.messages.list_async(to=USER, limit=20)
    assert (listed.sid, listed.body) == (taken["sid"], "taken, then dropped")


async def test_list_filters_by_to_and_from_newest_first(sink: TwilioSink, client: Client) -> None:
    other_sender = "whatsapp:+15005550006"
    for to, from_, body in [
        (USER, BOT, "one"),
        (OTHER, BOT, "to someone else"),
        (USER, BOT, "two"),
        (USER, other_sender, "from another number"),
        (USER, BOT, "three"),
    ]:
        await client.messages.create_async(to=to, from_=from_, body=body)

    mine = await client.messages.list_async(to=USER, from_=BOT, limit=20)
    assert [m.body for m in mine] == ["three", "two", "one"]
    assert [m.sid for m in mine] == [m["sid"] for m in reversed(sink.messages(to=USER)) if m["from"] == BOT]
    first = mine[0]
    assert (first.to, first.from_, first.status, first.direction) == (USER, BOT, "queued", "outbound-api")
    assert first.account_sid == SID and first.uri == f"/2010-04-01/Accounts/{SID}/Messages/{first.sid}.json"
    assert isinstance(first.date_created, datetime) and first.date_created.tzinfo is not None
    assert abs(first.date_created.timestamp() - time.time()) < 5
    assert [m.body for m in await client.messages.list_async(to=USER, limit=20)] == [
        "three",
        "from another number",
        "two",
        "one",
    ]
    assert [m.body for m in await client.messages.list_async(to=OTHER)] == ["to someone else"]
    assert [m.body for m in await client.messages.list_async(from_=other_sender)] == ["from another number"]
    assert await client.messages.list_async(to="whatsapp:+15550000000") == []
    assert len(await client.messages.list_async()) == 5
    # limit=20 asks for one page of 20; no limit, for Twilio's default page of 50.
    assert [(q["to"], q["from"], q["page_size"], q["status"], q["listed"]) for q in sink.lookups()] == [
        (USER, BOT, 20, 200, 3),
        (USER, None, 20, 200, 4),
        (OTHER, None, None, 200, 1),
        (None, other_sender, None, 200, 1),
        ("whatsapp:+15550000000", None, None, 200, 0),
        (None, None, None, 200, 5),
    ]


async def test_list_pages_through_next_page_uri(sink: TwilioSink, client: Client) -> None:
    for body in ("a", "b", "c", "d", "e"):
        await client.messages.create_async(to=USER, from_=BOT, body=body)
    # A message arriving between two pages does not shift the next one: the page token names the last one seen.
    pages = await client.messages.page_async(to=USER, page_size=2)
    assert [m.body for m in pages] == ["e", "d"]
    await client.messages.create_async(to=USER, from_=BOT, body="f")
    second = await pages.next_page_async()
    assert second is not None and [m.body for m in second] == ["c", "b"]
    third = await second.next_page_async()
    assert third is not None and [m.body for m in third] == ["a"]
    assert third.next_page_url is None and await third.next_page_async() is None

    assert [m.body for m in await client.messages.list_async(to=USER, page_size=4)] == ["f", "e", "d", "c", "b", "a"]
    assert [m.body for m in await client.messages.list_async(to=USER, limit=3)] == ["f", "e", "d"]


async def test_list_page_has_twilios_shape(sink: TwilioSink, sink_server: tuple[TwilioSink, str]) -> None:
    auth = {"Authorization": "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()}
    uri = f"/2010-04-01/Accounts/{SID}/Messages.json"
    async with aiohttp.ClientSession(base_url=sink_server[1], headers=auth) as http:
        created = await (await http.post(uri, data={"To": USER, "From": BOT, "Body": "shape"})).json()
        reply = await http.get(uri, params={"To": USER, "PageSize": "20"})
        assert reply.status == 200
        page = await reply.json()
        assert page == {
            "messages": [created],  # each message exactly as the create call answered it
            "end": 0,
            "first_page_uri": f"{uri}?To=whatsapp%3A%2B15551234567&PageSize=20&Page=0",
            "next_page_uri": None,
            "page": 0,
            "page_size": 20,
            "previous_page_uri": None,
            "start": 0,
            "uri": f"{uri}?To=whatsapp%3A%2B15551234567&PageSize=20&Page=0",
        }
        for bad in ("0", "1001", "many"):
            refused = await http.get(uri, params={"PageSize": bad})
            assert refused.status == 400 and (await refused.json())["code"] == 20001


async def test_list_shows_the_status_the_callbacks_reported(
    sink: TwilioSink, client: Client, receiver_server: tuple[CallbackReceiver, str]
) -> None:
    receiver, callback_url = receiver_server
    sink.fail_delivery(to=USER, status="undelivered")
    message = await client.messages.create_async(to=USER, from_=BOT, body="late news", status_callback=callback_url)
    await asyncio.to_thread(receiver.wait_for, 2, message.sid)
    [listed] = await client.messages.list_async(to=USER)
    assert (listed.sid, listed.status, listed.error_code) == (message.sid, "undelivered", 63016)
    assert isinstance(listed.date_sent, datetime)


async def test_list_with_wrong_credentials_is_401(
    sink: TwilioSink, client: Client, sink_server: tuple[TwilioSink, str]
) -> None:
    await client.messages.create_async(to=USER, from_=BOT, body="exists")
    for sid, token in ((SID, "wrong"), ("AC" + "f" * 32, TOKEN)):
        bad = make_client(sink_server[1], sid=sid, token=token)
        try:
            with pytest.raises(TwilioException) as refused:
                await bad.messages.list_async(to=USER, limit=20)
        finally:
            await bad.http_client.close()
        # The SDK raises a bare TwilioException for a page it could not fetch, with the response.
        response = refused.value.args[1]
        assert response.status_code == 401 and json.loads(response.text)["code"] == 20003
    assert [(q["status"], q["outcome"], q["listed"]) for q in sink.lookups()] == [(401, "error", 0)] * 2


async def test_list_faults(sink: TwilioSink, client: Client) -> None:
    await client.messages.create_async(to=USER, from_=BOT, body="exists")
    sink.inject_list(status=500, to=OTHER)  # skipped by a lookup for USER
    sink.inject_list(status=503)
    with pytest.raises(TwilioException) as failed:
        await client.messages.list_async(to=USER, limit=20)
    assert failed.value.args[1].status_code == 503
    assert [m.body for m in await client.messages.list_async(to=USER, limit=20)] == ["exists"]
    with pytest.raises(TwilioException):
        await client.messages.list_async(to=OTHER, limit=20)

    sink.inject_list(reset=True)
    with pytest.raises(aiohttp.ClientError):
        await client.messages.list_async(to=USER, limit=20)

    sink.inject_list(status=200, delay=0.3)  # slow (a hang, to a caller with a shorter timeout)
    started = time.monotonic()
    assert len(await client.messages.list_async(to=USER, limit=20)) == 1
    assert time.monotonic() - started >= 0.3
    sink.inject_list(status=200, delay=0.6)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await client.messages.list_async(to=USER, limit=20)
    # The sink answers the abandoned request when its delay is over.
    lookups = await asyncio.to_thread(sink.wait_for_lookups, 6, timeout=5.0)
    assert [(q["to"], q["status"], q["outcome"]) for q in lookups] == [
        (USER, 503, "error"),
        (USER, 200, "listed"),
        (OTHER, 500, "error"),
        (USER, None, "reset"),
        (USER, 200, "listed"),
        (USER, 200, "listed"),
    ]
    assert lookups[-1]["at"] - lookups[-2]["at"] >= 0.6
    assert sink.attempts() == [a for a in sink.attempts() if a["body"] == "exists"]  # lookups are not attempts


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
        assert await (await http.get("/_sink/lookups")).json() == []
        filtered = await (await http.get("/_sink/messages", params={"to": OTHER})).json()
        assert filtered == []
        assert (await http.delete("/_sink/messages")).status == 204
    assert sink.messages() == []


INBOUND = "SM" + "a" * 32
LATER = "SM" + "b" * 32


async def typing(client: Client, message_id: str = INBOUND) -> bool | None:
    indicator = await client.messaging.v2.typing_indicator.create_async(channel="whatsapp", message_id=message_id)
    return indicator.success


async def test_typing_indicator(sink: TwilioSink, client: Client) -> None:
    assert await typing(client) is True
    assert [(t["channel"], t["message_id"]) for t in sink.typing_indicators()] == [("whatsapp", INBOUND)]
    [record] = sink.wait_for_typing(1, message_id=INBOUND, timeout=1.0)
    assert (record["status"], record["outcome"], record["to"]) == (200, "accepted", None)  # not told whose it is
    assert record["form"] == {"channel": "whatsapp", "messageId": INBOUND}


async def test_typing_indicator_checks_credentials_and_its_form(
    sink: TwilioSink, client: Client, sink_server: tuple[TwilioSink, str]
) -> None:
    bad = make_client(sink_server[1], token="wrong")
    try:
        with pytest.raises(TwilioRestException) as refused:
            await typing(bad)
    finally:
        await bad.http_client.close()
    assert (refused.value.status, refused.value.code) == (401, 20003)
    for message_id in ("12345", "SM" + "a" * 31, "XX" + "a" * 32):
        with pytest.raises(TwilioRestException) as invalid:
            await typing(client, message_id)
        assert (invalid.value.status, invalid.value.code) == (400, 20001)
    with pytest.raises(TwilioRestException) as channel:
        await client.messaging.v2.typing_indicator.create_async(channel="rcs", message_id=INBOUND)
    assert channel.value.status == 400
    assert [(t["status"], t["outcome"]) for t in sink.typing_indicators()] == [(401, "error")] + [(400, "error")] * 4
    assert sink.typing(USER)["read"] == []


async def test_typing_indicator_faults(sink: TwilioSink, client: Client) -> None:
    sink.inject_typing(status=503, message_id=INBOUND)
    with pytest.raises(TwilioRestException) as unavailable:
        await typing(client)
    assert (unavailable.value.status, unavailable.value.code) == (503, 20500)
    assert await typing(client, LATER) is True  # the fault was for the other message
    assert await typing(client) is True  # and for one request only

    sink.inject_typing(status=500, reset=True)
    with pytest.raises(aiohttp.ClientError):
        await typing(client)

    sink.inbound(INBOUND, USER)
    sink.inject_typing(status=200, delay=0.5)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await typing(client)
    # Shown before the answer came late: the caller that gave up cannot tell.
    assert sink.typing(USER)["typing"] is True
    assert [t["outcome"] for t in sink.typing_indicators()] == ["error", "accepted", "accepted", "reset", "accepted"]

    sink.inject_typing(status=429, count=2)
    for _ in range(2):
        with pytest.raises(TwilioRestException) as limited:
            await typing(client)
        assert (limited.value.status, limited.value.code) == (429, 20429)
    sink.inject_typing(status=500)
    sink.clear_faults()
    assert await typing(client) is True


async def test_a_live_typing_indicator_per_user_until_a_message_to_them(
    sink: TwilioSink, client: Client, sink_server: tuple[TwilioSink, str]
) -> None:
    sink.inbound(INBOUND, USER)
    sink.inbound(LATER, OTHER)
    assert sink.typing(USER) == {"typing": False, "message_id": None, "expires_in": None, "read": []}
    assert await typing(client) is True
    shown = sink.typing(USER)
    assert (shown["typing"], shown["message_id"], shown["read"]) == (True, INBOUND, [INBOUND])
    assert 24.0 < shown["expires_in"] <= 25.0
    assert sink.typing(OTHER)["typing"] is False  # another user's chat shows nothing
    async with aiohttp.ClientSession(base_url=sink_server[1]) as http:
        over_http = await (await http.get("/_sink/typing", params={"to": USER})).json()
    assert (over_http["typing"], over_http["read"]) == (True, [INBOUND])

    await client.messages.create_async(to=OTHER, from_=BOT, body="to someone else")
    assert sink.typing(USER)["typing"] is True
    await client.messages.create_async(to=USER, from_=BOT, body="the answer")
    assert sink.typing(USER) == {"typing": False, "message_id": None, "expires_in": None, "read": [INBOUND]}

    # A webhook's TwiML reply ends it too, once the sink is told it went out.
    assert await typing(client, LATER) is True
    assert sink.typing(OTHER)["typing"] is True
    sink.replied(OTHER)
    assert sink.typing(OTHER)["typing"] is False
    sink.clear()
    assert sink.typing(USER)["read"] == []


async def test_a_typing_indicator_ends_by_itself() -> None:
    sink = TwilioSink(account_sid=SID, auth_token=TOKEN, typing_lasts_s=0.3)
    with LoopbackServer(sink.app, name="twilio-sink") as server:
        client = make_client(server.url)
        try:
            sink.inbound(INBOUND, USER)
            assert await typing(client) is True
            assert sink.typing(USER)["typing"] is True
            await until(lambda: not sink.typing(USER)["typing"], 2.0, "the indicator to lapse")
            assert sink.typing(USER)["read"] == [INBOUND]  # read it stays
        finally:
            await client.http_client.close()


# ---------------------------------------------------------------- media


def _basic(sid: str = SID, token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(sid, token)}


def _origin(url: str) -> str:
    return "/".join(url.split("/")[:3])


async def test_media_url_is_twilio_shaped_and_redirects_to_storage_on_another_origin(sink: TwilioSink) -> None:
    message_sid = "MM" + "b" * 32
    url = sink.add_media(b"\x89PNG fake", "image/png", message_sid=message_sid)
    assert url.startswith(f"{sink.api_url}/2010-04-01/Accounts/{SID}/Messages/{message_sid}/Media/ME")
    assert len(url.rsplit("/", 1)[-1]) == 34
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=_basic(), allow_redirects=False) as first:
            assert first.status == 307
            location = first.headers["Location"]
        assert _origin(location) == sink.media_storage_url() != _origin(url)
        # The storage URL needs no credentials, as Twilio's storage does not.
        async with http.get(location) as stored:
            assert stored.status == 200
            assert stored.headers["Content-Type"] == "image/png"
            assert stored.headers["Content-Length"] == str(len(b"\x89PNG fake"))
            assert await stored.read() == b"\x89PNG fake"
    fetches = sink.wait_for_media_fetches(2)
    assert [(f["origin"], f["authorization"], f["status"], f["bytes"]) for f in fetches] == [
        ("api", True, 307, 0),
        ("storage", False, 200, len(b"\x89PNG fake")),
    ]


async def test_a_client_following_the_redirect_gets_the_bytes(sink: TwilioSink) -> None:
    url = sink.add_media(b"OggS voice", "audio/ogg")
    async with aiohttp.ClientSession() as http, http.get(url, headers=_basic()) as response:
        assert response.status == 200
        assert response.content_type == "audio/ogg"
        assert await response.read() == b"OggS voice"


async def test_media_needs_the_accounts_credentials(sink: TwilioSink) -> None:
    url = sink.add_media(b"x", "image/jpeg")
    async with aiohttp.ClientSession() as http:
        for auth in ({}, _basic(token="wrong"), _basic(sid="AC" + "9" * 32)):
            async with http.get(url, headers=auth, allow_redirects=False) as response:
                assert response.status == 401
                assert (await response.json())["code"] == 20003
    assert [f["status"] for f in sink.media_fetches()] == [401, 401, 401]
    assert [f["authorization"] for f in sink.media_fetches()] == [False, True, True]


async def test_expired_or_unknown_media_is_404(sink: TwilioSink) -> None:
    url = sink.add_media(b"x", "image/jpeg")
    sink.expire_media(url)
    unknown = url.rsplit("/", 1)[0] + "/ME" + "0" * 32
    async with aiohttp.ClientSession() as http:
        for target in (url, unknown):
            async with http.get(target, headers=_basic()) as response:
                assert response.status == 404
                body = await response.json()
                assert (body["code"], body["status"]) == (20404, 404)


async def test_media_resource_json_validates_against_twilios_spec(sink: TwilioSink) -> None:
    message_sid = "MM" + "c" * 32
    url = sink.add_media(b"%PDF-1.4", "application/pdf", message_sid=message_sid)
    async with aiohttp.ClientSession() as http, http.get(url + ".json", headers=_basic()) as response:
        assert response.status == 200
        resource = await response.json()
    assert not specs.problems(specs.validator("twilio.json", "api.v2010.account.message.media"), resource, closed=True)
    assert (resource["content_type"], resource["parent_sid"]) == ("application/pdf", message_sid)
    assert url.endswith(resource["uri"].removesuffix(".json"))


async def test_upload_endpoint_returns_a_media_url(sink: TwilioSink, sink_server: tuple[TwilioSink, str]) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{sink_server[1]}/_sink/media",
            data=b"RIFF wav",
            headers={"Content-Type": "audio/wav"},
            params={"message_sid": "MM" + "d" * 32},
        ) as uploaded:
            assert uploaded.status == 201
            answer = await uploaded.json()
        assert answer["media_url"].startswith(f"{sink_server[1]}/2010-04-01/Accounts/{SID}/Messages/MM{'d' * 32}/")
        assert (answer["content_type"], answer["bytes"], answer["message_sid"]) == ("audio/wav", 8, "MM" + "d" * 32)
        async with http.get(answer["media_url"], headers=_basic()) as fetched:
            assert (fetched.content_type, await fetched.read()) == ("audio/wav", b"RIFF wav")
        async with http.get(f"{sink_server[1]}/_sink/media_fetches") as listed:
            assert [f["origin"] for f in await listed.json()] == ["api", "storage"]


async def test_media_faults_slow_chunked_and_extra_hops(sink: TwilioSink) -> None:
    data = bytes(range(256)) * 1024  # 256 KiB: several chunks
    slow = sink.add_media(data, "video/mp4", delay=0.3)
    chunked = sink.add_media(data, "video/mp4", chunked=True)
    hops = sink.add_media(b"far", "image/webp", hops=3)
    async with aiohttp.ClientSession() as http:
        started = time.monotonic()
        async with http.get(slow, headers=_basic()) as response:
            assert await response.read() == data
        assert time.monotonic() - started >= 0.3
        async with http.get(chunked, headers=_basic()) as response:
            assert "Content-Length" not in response.headers
            assert await response.read() == data
        async with http.get(hops, headers=_basic()) as response:
            assert await response.read() == b"far"
            assert len(response.history) == 3
    statuses = [(f["origin"], f["status"]) for f in sink.wait_for_media_fetches(8)][-4:]
    assert statuses == [("api", 307), ("storage", 307), ("storage", 307), ("storage", 200)]


async def test_clear_forgets_media_and_fetches(sink: TwilioSink) -> None:
    url = sink.add_media(b"x", "image/png")
    async with aiohttp.ClientSession() as http, http.get(url, headers=_basic()) as response:
        await response.read()
    sink.wait_for_media_fetches(2)
    sink.clear()
    assert sink.media_fetches() == []
    async with aiohttp.ClientSession() as http, http.get(url, headers=_basic()) as response:
        assert response.status == 404
