"""Sending WhatsApp messages through Twilio's REST Messages API, each call bounded and retried.

twilio-python's async client ignores its timeout setting, so every call is bounded here with asyncio.timeout.
Transient failures (5xx, 429, timeouts, connection errors) are retried with exponential backoff, or after the
Retry-After Twilio asks for when it is longer (bot/backoff.py); a 4xx such as 63016 (outside WhatsApp's 24-hour
window) is final.

Twilio's Messages API has no idempotency key: when a call times out, or its connection drops, the bot cannot tell
whether Twilio took the message. Before retrying such an ambiguous failure (never a 4xx, 429 or 5xx: Twilio answered
those, it did not create the message) the bot looks it up: it lists the latest messages to the same user from the
same sender, and a message with exactly the same body created since the send began (less `_CLOCK_SLACK_S` for
Twilio's whole-second timestamps and clock skew) is taken as this one: the send is done (`Sent.recovered`), nothing
is sent twice. The lookup runs after the backoff, giving Twilio time to finish the request, and also after the last
attempt, since the follow-up's next round would otherwise send the message again.

What is guaranteed: a message Twilio took and listed before the lookup is not sent again. What is not:
- a lookup that fails or times out, or a message Twilio creates (or lists) only after the lookup, is retried,
  and the user gets it twice: a lost answer would be worse than a repeated one;
- after a crash between Twilio taking a message and the journal recording it, the resumed follow-up looks the
  message up before sending it (`maybe_sent_since`, the user's message's arrival); a lookup that fails there
  sends it again;
- another message with exactly the same text to the same user, created within `_CLOCK_SLACK_S` before this send
  began (for a resumed follow-up: since the user's message arrived), is mistaken for this one, which is then not
  sent again (the user already has that text).
Timeouts are generous (`WABOT_TWILIO_CALL_TIMEOUT`, 10 s) to make all of these rare.
"""

from __future__ import annotations

import asyncio
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
from opentelemetry import trace
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from bot.backoff import Backoff, parse_retry_after
from bot.settings import Settings
from bot.xml_text import xml_safe
from telemetry.tracing import ActiveSpan, record_error

# Between the attempts of one call; a Retry-After above 30 s is not waited for in full: the answer is already late.
CALL_BACKOFF = Backoff(base_s=0.5, cap_s=8.0, retry_after_cap_s=30.0)
# After an ambiguous failure: how many of the latest messages to the user are looked at, and how much earlier than
# the send's start one may have been created (Twilio's timestamps are whole seconds, its clock is not ours).
_LOOKUP_LIMIT = 20
_CLOCK_SLACK_S = 2.0

# The Retry-After of the last Twilio answer in this task (the run's task sends its own messages one by one).
_retry_after: ContextVar[float | None] = ContextVar("twilio_retry_after", default=None)


async def _keep_retry_after(_session: Any, _context: Any, params: aiohttp.TraceRequestEndParams) -> None:
    # twilio's exceptions drop the response headers, so Retry-After is kept aside as each response arrives.
    _retry_after.set(parse_retry_after(params.response.headers.get("Retry-After")))


def _http_client() -> AsyncTwilioHttpClient:
    trace_config = aiohttp.TraceConfig()
    trace_config.on_request_end.append(_keep_retry_after)
    return AsyncTwilioHttpClient(trace_configs=[trace_config])


class DeliveryError(Exception):
    """Twilio did not accept a message. `code` is Twilio's error code when it gave one."""

    def __init__(self, error_type: str, message: str, *, code: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.code = code
        self.attempts = attempts


@dataclass(frozen=True)
class Sent:
    """A message Twilio took. `recovered`: a call failed ambiguously and the lookup found the message it had sent."""

    sid: str
    attempts: int
    recovered: bool = False


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, TwilioRestException):
        status: int = exc.status
        return status >= 500 or status == 429
    return _ambiguous(exc)


def _ambiguous(exc: BaseException) -> bool:
    """No answer from Twilio (our timeout, a connection error): it may or may not have taken the message."""
    return isinstance(exc, TimeoutError | aiohttp.ClientError | OSError)


class TwilioSender:
    """Twilio's async REST client pointed at `WABOT_TWILIO_API_URL`."""

    def __init__(self, settings: Settings, tracer: trace.Tracer) -> None:
        self._http = _http_client()
        self._client = Client(
            settings.twilio_account_sid or "AC" + "0" * 32,
            settings.secret("twilio_auth_token") or "unset",
            http_client=self._http,
        )
        self._client.api.base_url = settings.twilio_api_url
        self._client.messaging.base_url = messaging_url(settings.twilio_api_url)
        self._from = settings.twilio_whatsapp_from or ""
        self._status_callback = f"{settings.public_url}/whatsapp/status" if settings.public_url else None
        self._call_timeout = settings.twilio_call_timeout
        self._max_attempts = settings.twilio_max_attempts
        self._server = settings.twilio_api_url.split("://", 1)[-1].split("/", 1)[0]
        self._tracer = tracer

    async def send(self, to: str, body: str, *, maybe_sent_since: float | None = None) -> Sent:
        """Send one message; retry transient failures, after looking the message up when Twilio may have taken it;
        raise DeliveryError when Twilio will not take it.

        `maybe_sent_since` (a time.time() stamp): an earlier process may have sent this message since then (it
        crashed before journaling that Twilio took it); it is looked up first and sent only when it is not there.
        """
        # What TwiML cannot carry is garbage here too; stripped first, so a lookup compares what was really sent.
        body = xml_safe(body)
        with ActiveSpan(
            self._tracer,
            "twilio.messages.create",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "http.request.method": "POST",
                "server.address": self._server,
                "wabot.message.length": len(body),
            },
        ) as span:
            # Wall-clock time, to compare with Twilio's date_created.
            started = time.time()
            attempt = 0
            if maybe_sent_since is not None and (found := await self._find_sent(span, to, body, maybe_sent_since, 0)):
                return found
            while True:
                attempt += 1
                span.set_attribute("wabot.delivery.attempts", attempt)
                _retry_after.set(None)
                try:
                    async with asyncio.timeout(self._call_timeout):
                        message = await self._client.messages.create_async(
                            to=to, from_=self._from, body=body, status_callback=self._status_callback
                        )
                except Exception as exc:
                    retry = _transient(exc) and attempt < self._max_attempts
                    if retry:
                        await asyncio.sleep(_backoff(exc, attempt))
                    if _ambiguous(exc) and (found := await self._find_sent(span, to, body, started, attempt)):
                        return found
                    if retry:
                        continue
                    # Raised without a local name: this frame lives on in the error's traceback, and a local holding
                    # the error would close a reference cycle, left for the garbage collector to find.
                    raise _recorded(span, _delivery_error(exc, attempt)) from exc
                span.set_attribute("twilio.message.sid", message.sid or "")
                return Sent(sid=message.sid or "", attempts=attempt)

    async def _find_sent(self, span: trace.Span, to: str, body: str, started: float, attempt: int) -> Sent | None:
        """The message Twilio holds to `to` with exactly `body`, created since `started`, as sent after `attempt`
        attempts; None when the latest messages hold none, or the lookup failed (then the caller retries: a
        duplicate beats a lost answer).

        Sets `wabot.delivery.recovered` on the span, and adds an event per lookup saying how it went.
        """
        event = {"wabot.delivery.attempts": attempt}
        try:
            async with asyncio.timeout(self._call_timeout):
                listed = await self._client.messages.list_async(to=to, from_=self._from, limit=_LOOKUP_LIMIT)
        except Exception as exc:
            # Only the error's name is kept: a local holding the error would close a reference cycle (see send).
            span.add_event("twilio.messages.list", {**event, "error.type": _lookup_error_type(exc)})
            span.set_attribute("wabot.delivery.recovered", False)
            return None
        earliest = started - _CLOCK_SLACK_S
        sid = next((m.sid for m in listed if m.body == body and _created_since(m.date_created, earliest)), None)
        span.add_event(
            "twilio.messages.list",
            {**event, "wabot.delivery.listed": len(listed), "wabot.delivery.found": sid is not None},
        )
        span.set_attribute("wabot.delivery.recovered", sid is not None)
        if sid is None:
            return None
        span.set_attribute("twilio.message.sid", sid)
        return Sent(sid=sid, attempts=attempt, recovered=True)

    @property
    def client(self) -> Client:
        """The SDK client, for the other Twilio APIs the bot calls (the typing indicator) on the same connections."""
        return self._client

    async def close(self) -> None:
        await self._http.close()


def messaging_url(api_url: str) -> str:
    """Where Twilio's Messaging v2 API (the typing indicator) is, given `WABOT_TWILIO_API_URL`.

    On Twilio itself it has a host of its own: messaging.twilio.com beside api.twilio.com (and likewise for a
    regional api.<region>.twilio.com). Any other base URL (the demo's sink, a test double, a proxy) serves both.
    """
    scheme, sep, rest = api_url.partition("://")
    host, slash, path = rest.partition("/")
    if sep and host.startswith("api.") and host.endswith(".twilio.com"):
        return f"{scheme}{sep}messaging.{host.removeprefix('api.')}{slash}{path}"
    return api_url


def _created_since(created: object, earliest: float) -> bool:
    return isinstance(created, datetime) and created.timestamp() >= earliest


def _lookup_error_type(exc: Exception) -> str:
    """The error type of a failed lookup, in `_delivery_error`'s terms."""
    # A page Twilio refuses raises a bare TwilioException("Unable to fetch page", response), not a TwilioRestException.
    response = exc.args[1] if isinstance(exc, TwilioException) and len(exc.args) > 1 else None
    status = getattr(response, "status_code", None)
    if isinstance(status, int) and not isinstance(exc, TwilioRestException):
        return "twilio_server_error" if status >= 500 else "rate_limited" if status == 429 else "rejected"
    return _delivery_error(exc, 1).error_type


def _backoff(exc: Exception, attempt: int) -> float:
    """Seconds before the next attempt: exponential, or Twilio's Retry-After (429, 503) when that is longer."""
    asked = isinstance(exc, TwilioRestException) and exc.status in (429, 503)
    return CALL_BACKOFF.delay(attempt, _retry_after.get() if asked else None)


def _recorded(span: trace.Span, error: DeliveryError) -> DeliveryError:
    """`error`, once the span says the call failed with it."""
    if error.code is not None:
        span.set_attribute("twilio.error_code", error.code)
    record_error(span, error.error_type)
    return error


def _delivery_error(exc: Exception, attempts: int) -> DeliveryError:
    if isinstance(exc, TwilioRestException):
        kind = "twilio_server_error" if exc.status >= 500 else "rate_limited" if exc.status == 429 else "rejected"
        return DeliveryError(kind, f"Twilio answered {exc.status}: {exc.msg}", code=exc.code, attempts=attempts)
    if isinstance(exc, TimeoutError):
        return DeliveryError("timeout", "Twilio did not answer in time", attempts=attempts)
    if isinstance(exc, aiohttp.ClientError | OSError):
        return DeliveryError("connection_error", f"{exc.__class__.__name__}: {exc}", attempts=attempts)
    if isinstance(exc, TwilioException):
        return DeliveryError("other", str(exc), attempts=attempts)
    return DeliveryError("other", f"{exc.__class__.__name__}: {exc}", attempts=attempts)
