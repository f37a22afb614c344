"""Sending WhatsApp messages through Twilio's REST Messages API, each call bounded and retried.

twilio-python's async client ignores its timeout setting, so every call is bounded here with asyncio.timeout.
Transient failures (5xx, 429, timeouts, connection errors) are retried with exponential backoff, or after the
Retry-After Twilio asks for when it is longer; a 4xx such as 63016 (outside WhatsApp's 24-hour window) is final.

Delivery is at least once, not exactly once: Twilio's Messages API has no idempotency key, so when a call times out
or its connection drops after Twilio took the message, the retry sends it a second time. Timeouts are generous
(`WABOT_TWILIO_CALL_TIMEOUT`, 10 s) to make that rare; a lost answer would be worse than a repeated one.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import aiohttp
from opentelemetry import trace
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from bot.settings import Settings
from telemetry.tracing import ActiveSpan, record_error

_BACKOFF_BASE_S = 0.5
_BACKOFF_MAX_S = 8.0
# A Retry-After above this is not waited for in full: the answer is already late.
_RETRY_AFTER_MAX_S = 30.0

# The Retry-After of the last Twilio answer in this task (the run's task sends its own messages one by one).
_retry_after: ContextVar[float | None] = ContextVar("twilio_retry_after", default=None)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delay-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


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
    sid: str
    attempts: int


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, TwilioRestException):
        return exc.status >= 500 or exc.status == 429
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
        self._from = settings.twilio_whatsapp_from or ""
        self._status_callback = f"{settings.public_url}/whatsapp/status" if settings.public_url else None
        self._call_timeout = settings.twilio_call_timeout
        self._max_attempts = settings.twilio_max_attempts
        self._server = settings.twilio_api_url.split("://", 1)[-1].split("/", 1)[0]
        self._tracer = tracer

    async def send(self, to: str, body: str) -> Sent:
        """Send one message; retry transient failures; raise DeliveryError when Twilio will not take it."""
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
            attempt = 0
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
                    if _transient(exc) and attempt < self._max_attempts:
                        await asyncio.sleep(_backoff(exc, attempt))
                        continue
                    # Raised without a local name: this frame lives on in the error's traceback, and a local holding
                    # the error would close a reference cycle, left for the garbage collector to find.
                    raise _recorded(span, _delivery_error(exc, attempt)) from exc
                span.set_attribute("twilio.message.sid", message.sid or "")
                return Sent(sid=message.sid or "", attempts=attempt)

    async def close(self) -> None:
        await self._http.close()


def _backoff(exc: Exception, attempt: int) -> float:
    """Seconds before the next attempt: exponential, or Twilio's Retry-After (429, 503) when that is longer."""
    delay = min(_BACKOFF_BASE_S * 2 ** (attempt - 1), _BACKOFF_MAX_S)
    retry_after = _retry_after.get()
    if isinstance(exc, TwilioRestException) and exc.status in (429, 503) and retry_after is not None:
        delay = min(max(delay, retry_after), _RETRY_AFTER_MAX_S)
    return delay


def _recorded(span: trace.Span, error: DeliveryError) -> DeliveryError:
    """`error`, once the span says the call failed with it."""
    if error.code is not None:
        span.set_attribute("twilio.error_code", error.code)
    record_error(span, error.error_type, str(error))
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
