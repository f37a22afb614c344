"""WhatsApp's "typing…" while the bot works on a message: Twilio's typing indicator, sent in the background.

A message accepted for a model run gets the indicator at once (`POST /v2/Indicators/Typing.json` on Twilio's
messaging host, `channel=whatsapp`, `messageId=<its MessageSid>`): WhatsApp shows it as read and "typing…" until a
reply arrives or 25 s pass. Not for a rejected, duplicate or rate-limited message, which no run answers, nor for one
that finds every model slot taken: its busy holding reply goes out at once and is itself the sign of life (and a bot
at capacity spares Twilio the extra calls). While the answer is still being prepared the indicator is sent again
every WABOT_TYPING_REFRESH seconds (20), never later than WABOT_FOLLOWUP_TIMEOUT after the message arrived; it stops
as soon as the answer (or apology) is ready to go. A run resumed after a restart gets none.

WhatsApp clears "typing…" when any message from the bot arrives, the holding reply included: a message that got the
holding reply gets its indicator again `AFTER_HOLDING_S` after it went back (time for Twilio to deliver it first),
then every refresh interval from then, so the user sees the bot is still at work between the holding reply and the
answer. Not while more than `BUSY_MESSAGES` messages are being answered at once: then the bot is in a burst or an
incident (every message held), and one more Twilio call per held message would cost the event loop what the
holding replies need (measured at 100 held messages a second on 2 cores: the bot's own p99 overhead went from 38 ms
to 839 ms); the regular refreshes go on.

Never on the critical path: each message's indicators are a task of their own, which neither the deadline race nor
the run ever awaits. Each call is bounded here (the SDK's async client ignores its timeout) by
WABOT_TWILIO_CALL_TIMEOUT, or the refresh interval when that is shorter so two calls never overlap, and is not
retried: the next refresh is its retry. A failure is counted, logged and traced, and changes nothing the user gets.
When the answer is ready, a call still waiting for Twilio is cancelled: an indicator landing after the reply would
show "typing…" under the answer for 25 s. So an answer faster than Twilio's round trip may come with no indicator.

The indicator gives way under a burst, where the reply deadline needs every bit of the event loop: an indicator that
cannot start within `MAX_LATE_S` of when it was due (the loop is that far behind), or while `MAX_IN_FLIGHT` calls
are already waiting for Twilio, is skipped (a `typing_indicator_skipped` debug line; the next refresh tries again).
Measured (tests/test_load.py, 1,000 messages at once, on 2 busy cores): sending every first indicator kept the
loop 20 s behind and 15-56 % of the webhooks past the load generator's 30 s; with these rules every one of them was
skipped and the bot's total times were as without indicators. One call costs the loop about 1.4 ms, mostly aiohttp
building the request.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import aiohttp
from opentelemetry import trace
from structlog.typing import FilteringBoundLogger
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.rest import Client

from bot.settings import Settings
from telemetry import metrics
from telemetry.recent import RecentActivity
from telemetry.tracing import ActiveSpan, detached_context, record_error

CHANNEL = "whatsapp"
MAX_LATE_S = 1.0  # the promise: a sign of life within a second; later than that the loop has better things to do
MAX_IN_FLIGHT = 100  # indicator calls waiting for Twilio at once (50 msg/s with Twilio at 300 ms needs ~15)
# After the holding reply: Twilio usually delivers a WhatsApp message within a second or two, and an indicator that
# lands before it is cleared by it. Never later than the next refresh would have been.
AFTER_HOLDING_S = 2.0
BUSY_MESSAGES = 100  # messages with an indicator at once above which none is sent again after the holding reply


class _Unsuccessful(Exception):
    """Twilio answered 200 with `"success": false`."""


class TypingIndicators:
    """Starts, refreshes and stops the typing indicator of each message being answered; one task per message."""

    def __init__(
        self,
        client: Client,
        settings: Settings,
        tracer: trace.Tracer,
        log: FilteringBoundLogger,
        recent: RecentActivity,
    ) -> None:
        # Resolved now, at start-up: the SDK imports its Messaging modules on first use, inside some webhook's turn.
        self._indicators = client.messaging.v2.typing_indicator
        self._server = client.messaging.base_url.split("://", 1)[-1].split("/", 1)[0]
        self._enabled = settings.typing_indicator
        self._refresh_s = settings.typing_refresh_s
        self._budget_s = settings.followup_timeout
        self._call_timeout = min(settings.twilio_call_timeout, settings.typing_refresh_s)
        self._tracer = tracer
        self._log = log
        self._recent = recent
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._in_flight = 0

    def begin(self, message_sid: str, arrived: float) -> None:
        """Show "typing…" for the message `message_sid`, which reached the app at `arrived` (time.monotonic()).
        Returns at once: the indicator is sent by a task of its own."""
        if not self._enabled or message_sid in self._tasks:
            return
        self._start(message_sid, arrived, arrived, observe_first=True)

    def held(self, message_sid: str, arrived: float) -> None:
        """The holding reply to `message_sid` is going back: show "typing…" again once it has arrived (it clears
        the indicator), then refresh from then on. Nothing happens for a message that has no indicator task."""
        task = self._tasks.get(message_sid)
        if task is None:
            return
        if len(self._tasks) > BUSY_MESSAGES:
            self._log.debug("typing_indicator_skipped", message_sid=message_sid, reason="busy", refresh=True)
            return
        # A call still waiting for Twilio now would land before the holding reply and be cleared by it anyway.
        task.cancel()
        again = time.monotonic() + min(AFTER_HOLDING_S, self._refresh_s)
        self._start(message_sid, arrived, again, observe_first=False)

    def _start(self, message_sid: str, arrived: float, start: float, *, observe_first: bool) -> None:
        indicate = self._indicate(message_sid, arrived, start, observe_first)
        # Not in the webhook's context, which holds its spans (telemetry/tracing.py); the callback neither.
        context = detached_context()
        task = asyncio.create_task(indicate, name=f"typing {message_sid}", context=context)
        self._tasks[message_sid] = task
        task.add_done_callback(self._forget, context=context)

    def stop(self, message_sid: str) -> None:
        """The answer to `message_sid` is ready: no more indicators for it, and none still on its way."""
        task = self._tasks.pop(message_sid, None)
        if task is not None:
            task.cancel()

    def active(self) -> int:
        """Messages whose indicator is being sent or refreshed."""
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel every indicator (the server is stopping) and wait, bounded, for their tasks to end."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)

    def _forget(self, task: asyncio.Task[None]) -> None:
        sid = task.get_name().removeprefix("typing ")
        if self._tasks.get(sid) is task:
            del self._tasks[sid]

    async def _indicate(self, message_sid: str, arrived: float, start: float, observe_first: bool) -> None:
        """Indicators due at `start` and every refresh interval after it (a slow call does not delay the next), while
        within the budget from `arrived`. `observe_first`: the first accepted one's latency from arrival is observed
        (the sign of life; not for those after the holding reply, which was one)."""
        first_accepted = not observe_first
        for k in itertools.count():
            due = start + k * self._refresh_s
            if due - arrived >= self._budget_s:
                return
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
            refresh = k > 0 or start > arrived
            late = time.monotonic() - due
            if late > MAX_LATE_S or self._in_flight >= MAX_IN_FLIGHT:
                reason = "late" if late > MAX_LATE_S else "in_flight"
                self._log.debug("typing_indicator_skipped", message_sid=message_sid, reason=reason, refresh=refresh)
                continue
            accepted = await self._send(message_sid, arrived, refresh=refresh, first=not first_accepted)
            first_accepted = first_accepted or accepted

    async def _send(self, message_sid: str, arrived: float, *, refresh: bool, first: bool) -> bool:
        """One indicator call, bounded; counted, logged and traced whatever its outcome (a cancellation aside). True
        when Twilio accepted it; `first`: none was accepted for this message before (its latency is observed)."""
        self._in_flight += 1
        try:
            error_type, code = await self._call(message_sid, refresh)
        finally:
            self._in_flight -= 1
        # Logged and observed in the message's own span (the run's), as the other events of its reply are.
        seconds = time.monotonic() - arrived
        if error_type is not None:
            metrics.TYPING_INDICATORS.labels(outcome="failed").inc()
            self._recent.record_typing("failed")
            self._log.warning(
                "typing_indicator",
                message_sid=message_sid,
                outcome="failed",
                seconds=round(seconds, 4),
                refresh=refresh,
                error_type=error_type,
                error_code=code,
            )
            return False
        metrics.TYPING_INDICATORS.labels(outcome="sent").inc()
        if first:
            metrics.observe(metrics.TYPING_INDICATOR_SECONDS, seconds)
        self._recent.record_typing("sent", seconds if first else None)
        self._log.info(
            "typing_indicator", message_sid=message_sid, outcome="sent", seconds=round(seconds, 4), refresh=refresh
        )
        return True

    async def _call(self, message_sid: str, refresh: bool) -> tuple[str | None, int | None]:
        """The call itself, in its span: None, None when Twilio accepted it, else the error type and Twilio's code."""
        with ActiveSpan(
            self._tracer,
            "twilio.typing_indicator.create",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "http.request.method": "POST",
                "server.address": self._server,
                "wabot.typing.refresh": refresh,
            },
        ) as span:
            try:
                async with asyncio.timeout(self._call_timeout):
                    indicator = await self._indicators.create_async(channel=CHANNEL, message_id=message_sid)
                if indicator.success is False:
                    raise _Unsuccessful
            except Exception as exc:
                error_type, code = _error_of(exc)
                if code is not None:
                    span.set_attribute("twilio.error_code", code)
                record_error(span, error_type)
                return error_type, code
        return None, None


def _error_of(exc: Exception) -> tuple[str, int | None]:
    """The error type (bot/outbound.py's names) and Twilio's error code, if it gave one, of a failed call."""
    if isinstance(exc, TwilioRestException | TwilioServiceException):
        status: int = exc.status
        kind = "twilio_server_error" if status >= 500 else "rate_limited" if status == 429 else "rejected"
        code = exc.code if isinstance(exc.code, int) else None
        return kind, code
    if isinstance(exc, TimeoutError):
        return "timeout", None
    if isinstance(exc, aiohttp.ClientError | OSError):
        return "connection_error", None
    if isinstance(exc, _Unsuccessful):
        return "unsuccessful", None
    return "other", None
