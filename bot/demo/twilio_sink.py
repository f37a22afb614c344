"""Twilio's REST Messages API on loopback: where the demo, tests and benchmarks send the bot's replies.

It accepts what `twilio.rest.Client(...).messages.create[_async]` sends once ``client.api.base_url``
points here, answers with a message resource the SDK parses, records every message, lists them as
`messages.list[_async]` reads them (newest first, filtered by To and From, paged), can inject faults (errors,
latency, dropped connections, a message taken but answered late or not at all, failed deliveries, a failing
list call) and posts signed status callbacks like Twilio.

Media, as an inbound message's ``MediaUrl{N}`` points at them: `add_media(data, content_type)` (or, over HTTP,
``POST /_sink/media`` with the bytes as the body, their type as Content-Type and optionally ``?message_sid=MM…``,
answered 201 with ``{"media_url", "sid", "message_sid", "content_type", "bytes"}``) stores bytes and returns a
Twilio-shaped URL ``{api}/2010-04-01/Accounts/{AccountSid}/Messages/{MessageSid}/Media/{MediaSid}``. Fetching it
needs the account's HTTP Basic credentials (401 otherwise, 404 once expired) and answers 307 to the media storage
(bot/demo/media_storage.py) on ANOTHER origin, a second listener on 127.0.0.1 the sink starts on first use, which
serves the bytes with their content type to anyone holding the URL, as Twilio's storage does. ``…/Media/{sid}.json``
answers the Media resource. Faults per medium: expired (404), slow storage, no Content-Length, extra redirect hops.
`media_fetches()` (or ``GET /_sink/media_fetches``) records every fetch on either origin, with whether an
Authorization header reached it and how many bytes the storage handed out. The sink learns the base URL its media
URLs start with from `api_url` (set it to the URL it is served at; the HTTP upload falls back to the request's).

It also takes Messaging v2's typing indicators (`POST /v2/Indicators/Typing.json`, which the SDK sends once
``client.messaging.base_url`` points here too): Basic auth, the form checked as Twilio's spec says (`channel`
whatsapp, `messageId` a message SID), `{"success": true}` as the answer, faults of their own (`inject_typing`). Like
WhatsApp, it holds a live indicator per user: from an accepted indicator for one of the user's messages until a
message to that user is accepted (a REST message, or a webhook's TwiML reply it is told of with `replied`) or
`typing_lasts_s` (25 s) pass. Twilio knows which user sent an inbound message; the sink is told by whoever posts
one to the bot (`inbound`). An indicator for a message it was not told of is accepted (real Twilio would check it)
but is live for nobody.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import email.utils
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.requests import ClientDisconnect
from twilio.request_validator import RequestValidator

from bot.demo.loopback import LoopbackServer
from bot.demo.media_storage import MediaStorage, new_media

__all__ = ["TwilioSink", "mask_address"]

logger = logging.getLogger("wabot.demo.sink")

API_VERSION = "2010-04-01"
MAX_BODY_CHARS = 1600
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # what the demo's upload endpoint keeps in memory for one medium
CALLBACK_TIMEOUT_S = 5.0
TYPING_LASTS_S = 25.0  # WhatsApp drops "typing…" after 25 s without a reply
_MESSAGE_SID = re.compile(r"^(SM|MM)[0-9a-fA-F]{32}$")  # the spec's pattern for the typing indicator's messageId

_ERROR_MESSAGES = {
    20001: "Invalid paging parameter",
    20003: "Authenticate",
    20404: "The requested resource was not found",
    20429: "Too Many Requests",
    20500: "An internal server error has occurred",
    21602: "Message body is required.",
    21603: "A 'From' phone number is required.",
    21604: "A 'To' phone number is required.",
    21617: "The concatenated message body exceeds the 1600 character limit.",
    63016: (
        "Failed to send freeform message because you are outside the allowed window. "
        "If you are using WhatsApp, please use a Message Template."
    ),
}


def mask_address(address: str) -> str:
    """``whatsapp:+15551234567`` -> ``whatsapp:+1•••••4567``: phone numbers must never reach the logs."""
    channel, sep, number = address.rpartition(":")
    prefix = channel + sep
    digits = number.lstrip("+")
    plus = "+" if number.startswith("+") else ""
    if len(digits) < 8:
        return f"{prefix}{plus}•••••"
    # A fixed number of dots so the mask does not leak the length either.
    return f"{prefix}{plus}{digits[0]}•••••{digits[-4:]}"


def _twilio_error(
    status: int, code: int, message: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {
        "code": code,
        "message": message or _ERROR_MESSAGES.get(code, f"Simulated error {code}"),
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return JSONResponse(body, status_code=status, headers=headers)


def _rfc2822(dt: datetime) -> str:
    return email.utils.format_datetime(dt)


def _num_segments(body: str) -> int:
    # GSM-7 fits 160 characters per single SMS (153 when concatenated); anything else is UCS-2 (70 / 67).
    single, multi = (160, 153) if body.isascii() else (70, 67)
    if len(body) <= single:
        return 1
    return math.ceil(len(body) / multi)


@dataclass
class _Fault:
    status: int
    code: int | None
    remaining: int
    delay: float
    reset: bool
    retry_after: float | None
    to: str | None

    @classmethod
    def of(
        cls,
        *,
        ok: int,
        status: int,
        code: int | None,
        count: int,
        delay: float,
        reset: bool,
        to: str | None,
        retry_after: float | None = None,
    ) -> _Fault:
        """A fault for `count` requests; an error `status` (not `ok`) without `code` gets Twilio's usual one."""
        if count < 1:
            raise ValueError("count must be >= 1")
        if code is None and status != ok:
            code = 20429 if status == 429 else 20500
        return cls(status, code, count, delay, reset, retry_after, to)


@dataclass
class _Live:
    """A user's live typing indicator: for which of their messages, since when (time.monotonic())."""

    message_id: str
    at: float


@dataclass
class _DeliveryFault:
    status: str
    code: int
    remaining: int
    to: str | None


class _DroppedConnection(Response):
    """Starts a response and returns without its body, so uvicorn closes the socket mid-response.

    ASGI cannot close a connection before the status line; a truncated body is the closest thing and clients
    see it as a network error (aiohttp: ClientPayloadError / ServerDisconnectedError). uvicorn logs it at
    ERROR ("ASGI callable returned without completing response."), which is expected for this fault.
    """

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
            }
        )


class TwilioSink:
    """A fake Twilio Messages API for one account: serve `app`, set ``client.api.base_url`` to its URL."""

    def __init__(
        self,
        *,
        account_sid: str,
        auth_token: str,
        status_callbacks: bool = True,
        typing_lasts_s: float = TYPING_LASTS_S,
    ) -> None:
        self.account_sid = account_sid
        self._typing_lasts_s = typing_lasts_s
        self._auth_token = auth_token
        self._status_callbacks = status_callbacks
        self._validator = RequestValidator(auth_token)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._messages: list[dict[str, Any]] = []
        # The message resources as the API shows them, by sid (their status follows the callbacks).
        self._resources: dict[str, dict[str, Any]] = {}
        self._attempts: list[dict[str, Any]] = []
        self._lookups: list[dict[str, Any]] = []
        self._typing: list[dict[str, Any]] = []
        self._inbound: dict[str, str] = {}  # inbound message sid -> the user who sent it
        self._live: dict[str, _Live] = {}  # user -> their live typing indicator
        self._typing_faults: list[_Fault] = []
        self._faults: list[_Fault] = []
        self._list_faults: list[_Fault] = []
        self._delivery_faults: list[_DeliveryFault] = []
        self._callback_tasks: set[asyncio.Task[None]] = set()
        self._storage = MediaStorage()
        self._storage_server: LoopbackServer | None = None
        # The base URL media URLs start with: where this sink is served (the bot fetches only from its Twilio API
        # origin). Set by whoever serves the sink; the HTTP upload falls back to the URL it was called at.
        self.api_url: str | None = None
        self._app = self._build_app()

    # ---------------------------------------------------------------- public Python API

    @property
    def app(self) -> FastAPI:
        return self._app

    def messages(self, to: str | None = None) -> list[dict[str, Any]]:
        """Accepted messages, oldest first (copies): ``sid, to, from, body, status_callback, at, status``."""
        with self._lock:
            return copy.deepcopy([m for m in self._messages if to is None or m["to"] == to])

    def attempts(self) -> list[dict[str, Any]]:
        """Every create-message request, accepted or not: ``to, from, body, form`` (the whole form as sent),
        ``status, outcome, at``.

        `status` is the HTTP status answered (None for a dropped connection); `outcome` is accepted (the message
        was taken, whatever the caller then got), error or reset.
        """
        with self._lock:
            return copy.deepcopy(self._attempts)

    def lookups(self) -> list[dict[str, Any]]:
        """Every list-messages request: ``to, from, page_size, status, outcome, listed, at``.

        `to` and `from` are the filters asked for (None when absent); `status` is the HTTP status answered (None for
        a dropped connection); `outcome` is listed, error or reset; `listed` is the number of messages answered.
        """
        with self._lock:
            return copy.deepcopy(self._lookups)

    def typing_indicators(self) -> list[dict[str, Any]]:
        """Every typing-indicator request (``POST /v2/Indicators/Typing.json``), accepted or not: ``message_id,
        channel, to, form, status, outcome, at``.

        `to` is the user who sent the message (None when the sink was not told, see `inbound`); `form` the whole
        form as sent; `status` the HTTP status answered (None for a dropped connection); `outcome` accepted (the
        indicator is shown, whatever the caller then got), error or reset.
        """
        with self._lock:
            return copy.deepcopy(self._typing)

    def add_media(
        self,
        data: bytes,
        content_type: str,
        *,
        message_sid: str | None = None,
        api_url: str | None = None,
        delay: float = 0.0,
        chunked: bool = False,
        hops: int = 1,
    ) -> str:
        """Store `data` and return its MediaUrl (``{api_url}/2010-04-01/Accounts/…/Media/ME…``).

        `message_sid` defaults to a new ``MM…``; `api_url` to `self.api_url`. Faults: the storage waits `delay`
        seconds before the first byte, omits Content-Length (`chunked`), or takes `hops` redirects in all (the API's
        307, then `hops - 1` more of its own).
        """
        base = api_url or self.api_url
        if not base:
            raise RuntimeError("set TwilioSink.api_url to the URL the sink is served at before adding media")
        if hops < 1:
            raise ValueError("hops must be >= 1")
        self.media_storage_url()  # started before the URL is handed out, so a fetch never waits for it
        media = new_media(
            data,
            content_type,
            message_sid or "MM" + uuid.uuid4().hex,
            delay=delay,
            chunked=chunked,
            hops=hops,
        )
        self._storage.add(media)
        path = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{media.message_sid}/Media/{media.sid}"
        return base.rstrip("/") + path

    def expire_media(self, media_url: str) -> None:
        """Make a MediaUrl answer 404 from now on, as Twilio does once media is deleted or expired."""
        self._storage.expire(media_url.rstrip("/").rsplit("/", 1)[-1])

    def media_fetches(self) -> list[dict[str, Any]]:
        """Every fetch of a media URL or of the storage, in order: ``origin`` (api or storage), ``media_sid``,
        ``authorization`` (whether an Authorization header arrived), ``status``, ``bytes`` (handed out by the storage,
        counted before each chunk is sent), ``finished`` (the storage is done streaming), ``at``."""
        return self._storage.fetches()

    def wait_for_media_fetches(self, n: int, *, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Block until at least `n` media fetches are recorded and every one has finished, and return them all."""
        return self._storage.wait_for_fetches(n, timeout=timeout)

    def media_storage_url(self) -> str:
        """The storage's base URL (another origin than the API's); starts its listener on first use."""
        with self._lock:
            if self._storage_server is None:
                server = LoopbackServer(self._storage.app, name="twilio-media-storage")
                server.start()
                self._storage_server = server
            return self._storage_server.url

    def shutdown(self) -> None:
        """Stop the media storage's listener, if it was started (the sink's own server is its owner's to stop)."""
        with self._lock:
            server, self._storage_server = self._storage_server, None
        if server is not None:
            server.stop()

    def inbound(self, message_sid: str, sender: str) -> None:
        """`sender` (``whatsapp:+E.164``) sent the message `message_sid` to the bot: Twilio would know, the sink is
        told by whoever posts the webhook, so that the message's typing indicator shows to its user."""
        with self._lock:
            self._inbound[message_sid] = sender

    def replied(self, to: str) -> None:
        """A webhook's TwiML reply to `to` went out. Twilio sends it as messages, which end the user's typing
        indicator like any other message; the sink never sees TwiML, so whoever posted the webhook says so."""
        with self._changed:
            self._live.pop(to, None)
            self._changed.notify_all()

    def typing(self, to: str) -> dict[str, Any]:
        """What WhatsApp shows user `to`: ``typing`` (a live indicator), its ``message_id`` and ``expires_in``
        (seconds), and ``read``, the user's messages that got an accepted indicator (shown as read), oldest first."""
        now = time.monotonic()
        with self._lock:
            live = self._live.get(to)
            if live is not None and now - live.at >= self._typing_lasts_s:
                del self._live[to]
                live = None
            read = [t["message_id"] for t in self._typing if t["to"] == to and t["outcome"] == "accepted"]
        return {
            "typing": live is not None,
            "message_id": live.message_id if live else None,
            "expires_in": round(self._typing_lasts_s - (now - live.at), 3) if live else None,
            "read": list(dict.fromkeys(read)),
        }

    def wait_for_typing(self, n: int, *, message_id: str | None = None, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Block until at least `n` typing indicators (for `message_id`, if given) were accepted; return them."""

        def matching() -> list[dict[str, Any]]:
            return [
                t
                for t in self._typing
                if t["outcome"] == "accepted" and (message_id is None or t["message_id"] == message_id)
            ]

        with self._changed:
            if not self._changed.wait_for(lambda: len(matching()) >= n, timeout):
                raise TimeoutError(
                    f"expected {n} typing indicator(s) within {timeout}s, got {len(matching())} "
                    f"({len(self._typing)} request(s) in all)"
                )
            return copy.deepcopy(matching())

    def clear(self) -> None:
        """Forget recorded messages, attempts, lookups, typing indicators, media and their fetches (queued faults
        stay queued)."""
        with self._lock:
            self._messages.clear()
            self._resources.clear()
            self._attempts.clear()
            self._lookups.clear()
            self._typing.clear()
            self._inbound.clear()
            self._live.clear()
        self._storage.clear()

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._list_faults.clear()
            self._delivery_faults.clear()
            self._typing_faults.clear()

    def wait_for_messages(self, n: int, *, to: str | None = None, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Block until at least `n` accepted messages (to `to`, if given) are recorded, and return them."""

        def matching() -> list[dict[str, Any]]:
            return [m for m in self._messages if to is None or m["to"] == to]

        with self._changed:
            if not self._changed.wait_for(lambda: len(matching()) >= n, timeout):
                got = matching()
                target = f" to {mask_address(to)}" if to else ""
                others = len(self._messages) - len(got)
                raise TimeoutError(
                    f"expected {n} message(s){target} within {timeout}s, got {len(got)}: "
                    f"{[m['body'] for m in got]!r} ({others} message(s) to other recipients, "
                    f"{len(self._attempts)} request(s) in all)"
                )
            return copy.deepcopy(matching())

    def wait_for_lookups(self, n: int, *, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Block until at least `n` list-messages requests have been answered (or dropped), and return them all."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._lookups) >= n, timeout):
                raise TimeoutError(f"expected {n} lookup(s) within {timeout}s, got {len(self._lookups)}")
            return copy.deepcopy(self._lookups)

    def inject(
        self,
        *,
        status: int = 500,
        code: int | None = None,
        count: int = 1,
        delay: float = 0.0,
        reset: bool = False,
        retry_after: float | None = None,
        to: str | None = None,
    ) -> None:
        """Queue a fault for the next `count` create-message requests (to `to`, if given); faults apply FIFO.

        For an error status the message is not taken: the delay comes first, then the connection is dropped
        (`reset`), or `status` is answered with a Twilio error body (`code` defaults to 20429 for 429 and 20500
        otherwise). For status 201 Twilio takes the message first (it is recorded, listed and its status callbacks
        run), then the answer comes after the delay, or the connection is dropped instead (`reset`): a caller that
        gives up waiting, or loses the connection, cannot tell that the message was sent.
        """
        fault = _Fault.of(
            ok=201, status=status, code=code, count=count, delay=delay, reset=reset, retry_after=retry_after, to=to
        )
        with self._lock:
            self._faults.append(fault)

    def inject_list(
        self,
        *,
        status: int = 500,
        code: int | None = None,
        count: int = 1,
        delay: float = 0.0,
        reset: bool = False,
        to: str | None = None,
    ) -> None:
        """Queue a fault for the next `count` list-messages requests (filtered on To `to`, if given), FIFO.

        The delay comes first (longer than the caller's timeout, it is a hang); then the connection is dropped
        (`reset`), or `status` is answered with a Twilio error body (`code` as for `inject`), or, for status
        200, the page is answered normally.
        """
        fault = _Fault.of(ok=200, status=status, code=code, count=count, delay=delay, reset=reset, to=to)
        with self._lock:
            self._list_faults.append(fault)

    def inject_typing(
        self,
        *,
        status: int = 500,
        code: int | None = None,
        count: int = 1,
        delay: float = 0.0,
        reset: bool = False,
        message_id: str | None = None,
    ) -> None:
        """Queue a fault for the next `count` typing-indicator requests (for `message_id`, if given), FIFO.

        As `inject` for messages: for an error status the indicator is not shown; the delay comes first, then the
        connection is dropped (`reset`) or `status` is answered with a Twilio error body. For status 200 the
        indicator is shown first, then answered after the delay, or the connection dropped instead (`reset`).
        """
        fault = _Fault.of(ok=200, status=status, code=code, count=count, delay=delay, reset=reset, to=message_id)
        with self._lock:
            self._typing_faults.append(fault)

    def fail_delivery(
        self, *, to: str | None = None, status: str = "undelivered", code: int = 63016, count: int = 1
    ) -> None:
        """Accept the next `count` messages (to `to`, if given) but report `status` + `ErrorCode` later."""
        if status not in ("failed", "undelivered"):
            raise ValueError("status must be 'failed' or 'undelivered'")
        if count < 1:
            raise ValueError("count must be >= 1")
        with self._lock:
            self._delivery_faults.append(_DeliveryFault(status, code, count, to))

    # ---------------------------------------------------------------- HTTP app

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="twilio-sink", docs_url=None, redoc_url=None, openapi_url=None)

        @app.post(f"/{API_VERSION}/Accounts/{{account_sid}}/Messages.json")
        async def create_message(account_sid: str, request: Request) -> Response:
            return await self._create_message(account_sid, request)

        @app.get(f"/{API_VERSION}/Accounts/{{account_sid}}/Messages.json")
        async def list_messages(account_sid: str, request: Request) -> Response:
            return await self._list_messages(account_sid, request)

        @app.post("/v2/Indicators/Typing.json")
        async def typing_indicator(request: Request) -> Response:
            return await self._typing_indicator(request)

        @app.get("/_sink/typing")
        async def get_typing(to: str) -> dict[str, Any]:
            return self.typing(to)

        @app.get(f"/{API_VERSION}/Accounts/{{account_sid}}/Messages/{{message_sid}}/Media/{{media_sid}}")
        async def fetch_media(account_sid: str, message_sid: str, media_sid: str, request: Request) -> Response:
            return self._fetch_media(account_sid, message_sid, media_sid, request)

        @app.post("/_sink/media")
        async def upload_media(request: Request, message_sid: str | None = None) -> Response:
            data = await request.body()
            if len(data) > MAX_UPLOAD_BYTES:
                return JSONResponse({"error": f"at most {MAX_UPLOAD_BYTES} bytes"}, status_code=413)
            content_type = request.headers.get("content-type", "application/octet-stream")
            api_url = self.api_url or str(request.base_url)
            # The storage's listener may start here: not on the sink's loop.
            await asyncio.to_thread(self.media_storage_url)
            url = self.add_media(data, content_type, message_sid=message_sid, api_url=api_url)
            parts = url.split("/")
            return JSONResponse(
                {
                    "media_url": url,
                    "sid": parts[-1],
                    "message_sid": parts[-3],
                    "content_type": content_type,
                    "bytes": len(data),
                },
                status_code=201,
            )

        @app.get("/_sink/media_fetches")
        async def get_media_fetches() -> list[dict[str, Any]]:
            return self.media_fetches()

        @app.get("/_sink/messages")
        async def get_messages(to: str | None = None) -> list[dict[str, Any]]:
            return self.messages(to)

        @app.delete("/_sink/messages")
        async def delete_messages() -> Response:
            self.clear()
            return Response(status_code=204)

        @app.get("/_sink/attempts")
        async def get_attempts() -> list[dict[str, Any]]:
            return self.attempts()

        @app.get("/_sink/lookups")
        async def get_lookups() -> list[dict[str, Any]]:
            return self.lookups()

        return app

    def _authorized(self, request: Request, path_sid: str | None = None) -> bool:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if path_sid is not None and path_sid != user:
            return False
        return user == self.account_sid and password == self._auth_token

    def _fetch_media(self, account_sid: str, message_sid: str, media_sid: str, request: Request) -> Response:
        sid = media_sid.removesuffix(".json")
        response = self._media_response(account_sid, message_sid, media_sid, request)
        fetch = {
            "origin": "api",
            "media_sid": sid,
            "authorization": "authorization" in request.headers,
            "status": response.status_code,
            "bytes": 0,
            "finished": True,
            "at": time.monotonic(),
        }
        self._storage.record(fetch)
        return response

    def _media_response(self, account_sid: str, message_sid: str, media_sid: str, request: Request) -> Response:
        if not self._authorized(request, account_sid):
            return _twilio_error(401, 20003)
        sid = media_sid.removesuffix(".json")
        media = self._storage.get(sid)
        if media is None or media.expired or media.message_sid != message_sid:
            return _twilio_error(404, 20404)
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{message_sid}/Media/{sid}"
        if media_sid.endswith(".json"):
            created = _rfc2822(datetime.fromtimestamp(media.created, UTC))
            resource = {
                "account_sid": self.account_sid,
                "content_type": media.content_type,
                "date_created": created,
                "date_updated": created,
                "parent_sid": message_sid,
                "sid": sid,
                "uri": f"{uri}.json",
            }
            return JSONResponse(resource)
        # Twilio answers a media URL with a temporary redirect to its storage, on another host.
        return RedirectResponse(f"{self.media_storage_url()}/media/{media.key}", status_code=307)

    def _take_fault(self, to: str, faults: list[_Fault] | None = None) -> _Fault | None:
        with self._lock:
            queue = self._faults if faults is None else faults
            for fault in queue:
                if fault.to is None or fault.to == to:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        queue.remove(fault)
                    return fault
        return None

    def _take_delivery_fault(self, to: str) -> _DeliveryFault | None:
        with self._lock:
            for fault in self._delivery_faults:
                if fault.to is None or fault.to == to:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._delivery_faults.remove(fault)
                    return fault
        return None

    def _record_attempt(self, form: dict[str, str], status: int | None, outcome: str) -> None:
        with self._changed:
            self._attempts.append(
                {
                    "to": form.get("To"),
                    "from": form.get("From"),
                    "body": form.get("Body"),
                    "form": form,
                    "status": status,
                    "outcome": outcome,
                    "at": time.monotonic(),
                }
            )
            self._changed.notify_all()

    async def _create_message(self, account_sid: str, request: Request) -> Response:
        form = {key: str(value) for key, value in (await request.form()).items()}

        def refuse(response: Response) -> Response:
            self._record_attempt(form, response.status_code, "error")
            return response

        if not self._authorized(request, account_sid):
            return refuse(_twilio_error(401, 20003))
        fault = self._take_fault(form.get("To", ""))
        # A 201 fault takes the message first and is answered late (or not at all) after: see below.
        if fault is not None and fault.status != 201:
            if fault.delay > 0:
                # This sleep IS the simulated Twilio latency, not a wait for some condition.
                await asyncio.sleep(fault.delay)
            if fault.reset:
                self._record_attempt(form, None, "reset")
                return _DroppedConnection()
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
            assert fault.code is not None
            return refuse(_twilio_error(fault.status, fault.code, headers=headers))

        to, from_, body = form.get("To"), form.get("From"), form.get("Body")
        if not to:
            return refuse(_twilio_error(400, 21604))
        if not from_:
            return refuse(_twilio_error(400, 21603))
        if body is None or body == "":
            return refuse(_twilio_error(400, 21602))
        if len(body) > MAX_BODY_CHARS:
            return refuse(_twilio_error(400, 21617))

        sid = "SM" + uuid.uuid4().hex
        now = _rfc2822(datetime.now(UTC))
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{sid}"
        status_callback = form.get("StatusCallback") or None
        resource = {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": from_,
            "messaging_service_sid": form.get("MessagingServiceSid") or None,
            "num_media": "0",
            "num_segments": str(_num_segments(body)),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "queued",
            "subresource_uris": {"media": f"{uri}/Media.json", "feedback": f"{uri}/Feedback.json"},
            "to": to,
            "uri": f"{uri}.json",
        }
        record = {
            "sid": sid,
            "to": to,
            "from": from_,
            "body": body,
            "status_callback": status_callback,
            "status": "queued",
            "at": time.monotonic(),
        }
        delivery_fault = self._take_delivery_fault(to)
        dropped = fault is not None and fault.reset
        with self._changed:
            self._live.pop(to, None)  # a message to the user ends their "typing…", as on WhatsApp
            self._messages.append(record)
            self._resources[sid] = resource
            self._attempts.append(
                {
                    "to": to,
                    "from": from_,
                    "body": body,
                    "form": form,
                    "status": None if dropped else 201,
                    "outcome": "accepted",
                    "at": record["at"],
                }
            )
            self._changed.notify_all()
        logger.info("sink: message to %s: %s", mask_address(to), body)

        if self._status_callbacks and status_callback:
            statuses: list[tuple[str, int | None]] = [("sent", None), ("delivered", None)]
            if delivery_fault is not None:
                # A message Twilio could not hand over to WhatsApp never reaches "sent".
                failure = (delivery_fault.status, delivery_fault.code)
                statuses = [failure] if delivery_fault.status == "failed" else [("sent", None), failure]
            task = asyncio.create_task(self._send_callbacks(status_callback, record, statuses))
            # Keep a reference: the event loop only holds weak references to tasks.
            self._callback_tasks.add(task)
            task.add_done_callback(self._callback_tasks.discard)
        if fault is not None:
            # Taken, and answered late: this sleep IS the simulated Twilio latency.
            if fault.delay > 0:
                await asyncio.sleep(fault.delay)
            if fault.reset:
                return _DroppedConnection()
        return JSONResponse(resource, status_code=201)

    async def _typing_indicator(self, request: Request) -> Response:
        try:
            form = {key: str(value) for key, value in (await request.form()).items()}
        except ClientDisconnect:
            return Response(status_code=400)  # the caller gave up before its request ended: nobody reads this
        message_id = form.get("messageId", "")
        record: dict[str, Any] = {"message_id": message_id, "channel": form.get("channel"), "to": None, "form": form}

        def answer(response: Response, outcome: str) -> Response:
            status = None if isinstance(response, _DroppedConnection) else response.status_code
            with self._changed:
                if outcome == "accepted":
                    record["to"] = to = self._inbound.get(message_id)
                    if to is not None:
                        self._live[to] = _Live(message_id, time.monotonic())
                self._typing.append({**record, "status": status, "outcome": outcome, "at": time.monotonic()})
                self._changed.notify_all()
            return response

        if not self._authorized(request):
            return answer(_twilio_error(401, 20003), "error")
        fault = self._take_fault(message_id, self._typing_faults)
        # A 200 fault shows the indicator first and is answered late (or not at all) after: see below.
        if fault is not None and fault.status != 200:
            if fault.delay > 0:
                # This sleep IS the simulated Twilio latency, not a wait for some condition.
                await asyncio.sleep(fault.delay)
            if fault.reset:
                return answer(_DroppedConnection(), "reset")
            assert fault.code is not None
            return answer(_twilio_error(fault.status, fault.code), "error")
        if form.get("channel") != "whatsapp":
            return answer(_twilio_error(400, 20001, "Invalid parameter: channel must be whatsapp"), "error")
        if not _MESSAGE_SID.fullmatch(message_id):
            return answer(_twilio_error(400, 20001, "Invalid parameter: messageId must be a message SID"), "error")
        accepted = answer(JSONResponse({"success": True}), "accepted")
        if fault is not None:
            # Shown, and answered late: this sleep IS the simulated Twilio latency.
            if fault.delay > 0:
                await asyncio.sleep(fault.delay)
            if fault.reset:
                return _DroppedConnection()
        return accepted

    async def _list_messages(self, account_sid: str, request: Request) -> Response:
        query = request.query_params
        to, from_ = query.get("To"), query.get("From")
        size = query.get("PageSize")
        lookup: dict[str, Any] = {"to": to, "from": from_, "page_size": int(size) if size and size.isdigit() else size}

        def answer(response: Response, outcome: str, listed: int = 0) -> Response:
            status = None if isinstance(response, _DroppedConnection) else response.status_code
            with self._changed:
                self._lookups.append(
                    {**lookup, "status": status, "outcome": outcome, "listed": listed, "at": time.monotonic()}
                )
                self._changed.notify_all()
            return response

        if not self._authorized(request, account_sid):
            return answer(_twilio_error(401, 20003), "error")
        fault = self._take_fault(to or "", self._list_faults)
        if fault is not None:
            if fault.delay > 0:
                # This sleep IS the simulated Twilio latency (or hang), not a wait for some condition.
                await asyncio.sleep(fault.delay)
            if fault.reset:
                return answer(_DroppedConnection(), "reset")
            if fault.status != 200:
                assert fault.code is not None
                return answer(_twilio_error(fault.status, fault.code), "error")
        try:
            page_size = int(query.get("PageSize") or DEFAULT_PAGE_SIZE)
            page = int(query.get("Page") or 0)
        except ValueError:
            return answer(_twilio_error(400, 20001), "error")
        if not 1 <= page_size <= MAX_PAGE_SIZE or page < 0:
            return answer(_twilio_error(400, 20001), "error")

        start = page * page_size
        token = query.get("PageToken")
        with self._lock:
            # Newest first, as Twilio lists them.
            sids = [
                m["sid"]
                for m in reversed(self._messages)
                if (to is None or m["to"] == to) and (from_ is None or m["from"] == from_)
            ]
            if token:
                # Twilio's page token names the last message of the page before ("PA" + its sid): the next page
                # starts right after it even when newer messages have come in since.
                start = sids.index(token[2:]) + 1 if token[2:] in sids else len(sids)
            messages = [copy.deepcopy(self._resources[sid]) for sid in sids[start : start + page_size]]

        base = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages.json"
        filters = {key: value for key, value in (("To", to), ("From", from_)) if value is not None}

        def page_uri(number: int, page_token: str | None = None) -> str:
            params = {**filters, "PageSize": page_size, "Page": number}
            if page_token:
                params["PageToken"] = page_token
            return f"{base}?{urlencode(params)}"

        more = start + page_size < len(sids)
        body = {
            "messages": messages,
            "end": start + len(messages) - 1 if messages else start,
            "first_page_uri": page_uri(0),
            "next_page_uri": page_uri(page + 1, "PA" + messages[-1]["sid"]) if more and messages else None,
            "page": page,
            "page_size": page_size,
            "previous_page_uri": page_uri(page - 1) if page > 0 else None,
            "start": start,
            "uri": page_uri(page, token),
        }
        return answer(JSONResponse(body), "listed", len(messages))

    async def _send_callbacks(self, url: str, record: dict[str, Any], statuses: list[tuple[str, int | None]]) -> None:
        timeout = aiohttp.ClientTimeout(total=CALLBACK_TIMEOUT_S)
        # One short-lived session per message: the sink may run on any loop and has no shutdown hook
        # that is guaranteed to run (e.g. when mounted inside another app).
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for status, error_code in statuses:
                params = {
                    "AccountSid": self.account_sid,
                    "ApiVersion": API_VERSION,
                    "ChannelPrefix": "whatsapp",
                    "From": record["from"],
                    "MessageSid": record["sid"],
                    "MessageStatus": status,
                    "SmsSid": record["sid"],
                    "SmsStatus": status,
                    "To": record["to"],
                }
                if error_code is not None:
                    params["ErrorCode"] = str(error_code)
                with self._lock:
                    record["status"] = status  # the very dict kept in self._messages
                    resource = self._resources.get(record["sid"])
                    if resource is not None:
                        now = _rfc2822(datetime.now(UTC))
                        resource.update(status=status, date_updated=now, error_code=error_code)
                        if status == "sent":
                            resource["date_sent"] = now
                        if error_code is not None:
                            resource["error_message"] = _ERROR_MESSAGES.get(error_code)
                headers = {
                    "X-Twilio-Signature": self._validator.compute_signature(url, params),
                    "I-Twilio-Idempotency-Token": str(uuid.uuid4()),
                    "User-Agent": "TwilioProxy/1.1",
                }
                try:
                    async with session.post(url, data=params, headers=headers) as response:
                        await response.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    logger.debug("sink: status callback %s for %s failed: %r", status, record["sid"], exc)
