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
answer.

Neither that one nor any refresh while more than `BUSY_MESSAGES` messages are being answered at once: then the bot
is in a burst or an incident (every message held), and refreshes grow with the messages in flight (one per message
per interval), costing the event loop what the holding replies need: in the incident benchmark they held the
holding replies back by seconds (docs/benchmarks.md, sections 5 and 6). The first indicator of each message (the
sign of life within a second) still goes out.

Never on the critical path: each message's indicators are sent by tasks of their own, started by a timer when due,
which neither the deadline race nor the run ever awaits. Each call is bounded here (the SDK's async client ignores
its timeout) by WABOT_TWILIO_CALL_TIMEOUT, or the refresh interval when that is shorter so two calls never overlap,
and is not retried: the next refresh is its retry. A failure is counted, logged and traced, and changes nothing the
user gets.
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
import contextvars
import time

import aiohttp
from opentelemetry import trace
from opentelemetry.trace import SpanContext
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
BUSY_MESSAGES = 100  # messages with an indicator at once above which no indicator but the first is sent


class _Unsuccessful(Exception):
    """Twilio answered 200 with `"success": false`."""


class _Indicators:
    """One message's indicators: the next one's number `k` (due at `start + k * refresh`), and what is pending for
    it: the timer that starts it, or the task sending it. A timer, not a task asleep: a message waits for its next
    refresh far longer than a call takes, and a sleeping task is ~15 objects the garbage collector walks, a timer 3
    (docs/benchmarks.md). `parent` is the span the calls' spans and log lines belong to (the message's)."""

    __slots__ = ("arrived", "first_accepted", "k", "parent", "pending", "sid", "start")

    def __init__(self, sid: str, arrived: float, start: float, first_accepted: bool, parent: SpanContext) -> None:
        self.sid = sid
        self.arrived = arrived
        self.start = start
        self.first_accepted = first_accepted
        self.parent = parent
        self.k = 0
        self.pending: asyncio.TimerHandle | asyncio.Task[None] | None = None


# The timers' context: they only start the calls' tasks, each in a context of its own (the message's span).
_TIMERS = contextvars.Context()


class TypingIndicators:
    """Starts, refreshes and stops the typing indicator of each message being answered."""

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
        self._messages: dict[str, _Indicators] = {}
        self._in_flight = 0

    def begin(self, message_sid: str, arrived: float) -> None:
        """Show "typing…" for the message `message_sid`, which reached the app at `arrived` (time.monotonic()).
        Returns at once: the indicator is sent by a task of its own."""
        if not self._enabled or message_sid in self._messages:
            return
        self._start(message_sid, arrived, arrived, observe_first=True)

    def held(self, message_sid: str, arrived: float) -> None:
        """The holding reply to `message_sid` is going back: show "typing…" again once it has arrived (it clears
        the indicator), then refresh from then on. Nothing happens for a message that has no indicators."""
        current = self._messages.get(message_sid)
        if current is None:
            return
        if len(self._messages) > BUSY_MESSAGES:
            self._log.debug("typing_indicator_skipped", message_sid=message_sid, reason="busy", refresh=True)
            return
        # A call still waiting for Twilio now would land before the holding reply and be cleared by it anyway.
        _cancel(current)
        again = time.monotonic() + min(AFTER_HOLDING_S, self._refresh_s)
        self._start(message_sid, arrived, again, observe_first=False)

    def _start(self, message_sid: str, arrived: float, start: float, *, observe_first: bool) -> None:
        # The current span is the message's (`wabot.reply`); only its ids are kept (telemetry/tracing.py).
        parent = trace.get_current_span().get_span_context()
        indicators = _Indicators(message_sid, arrived, start, not observe_first, parent)
        self._messages[message_sid] = indicators
        self._next(indicators)

    def stop(self, message_sid: str) -> None:
        """The answer to `message_sid` is ready: no more indicators for it, and none still on its way."""
        indicators = self._messages.pop(message_sid, None)
        if indicators is not None:
            _cancel(indicators)

    def active(self) -> int:
        """Messages whose indicator is being sent or refreshed."""
        return len(self._messages)

    async def close(self) -> None:
        """Cancel every indicator (the server is stopping) and wait, bounded, for the calls under way to end."""
        messages = list(self._messages.values())
        self._messages.clear()
        tasks = [m.pending for m in messages if isinstance(m.pending, asyncio.Task)]
        for indicators in messages:
            _cancel(indicators)
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)

    def _forget(self, indicators: _Indicators) -> None:
        if self._messages.get(indicators.sid) is indicators:
            del self._messages[indicators.sid]

    def _next(self, indicators: _Indicators) -> None:
        """Set the timer of indicator `k`, while within the budget from the message's arrival (a slow call does not
        delay the next: each is due at its own time)."""
        due = indicators.start + indicators.k * self._refresh_s
        if due - indicators.arrived >= self._budget_s:
            self._forget(indicators)
            return
        delay = max(0.0, due - time.monotonic())
        indicators.pending = asyncio.get_running_loop().call_later(delay, self._due, indicators, due, context=_TIMERS)

    def _due(self, indicators: _Indicators, due: float) -> None:
        """Indicator `k` is due: send it, or skip it when the loop is late or too many calls are waiting."""
        refresh = indicators.k > 0 or indicators.start > indicators.arrived
        late = time.monotonic() - due
        busy = refresh and len(self._messages) > BUSY_MESSAGES
        context = detached_context(indicators.parent)
        if busy or late > MAX_LATE_S or self._in_flight >= MAX_IN_FLIGHT:
            reason = "busy" if busy else "late" if late > MAX_LATE_S else "in_flight"
            context.run(
                self._log.debug, "typing_indicator_skipped", message_sid=indicators.sid, reason=reason, refresh=refresh
            )
            indicators.k += 1
            self._next(indicators)
            return
        send = self._send_due(indicators, refresh)
        indicators.pending = asyncio.create_task(send, name=f"typing {indicators.sid}", context=context)

    async def _send_due(self, indicators: _Indicators, refresh: bool) -> None:
        """`_send` the due indicator, then set the next one's timer; a message whose call failed unexpectedly (a
        bug) gets no more."""
        try:
            accepted = await self._send(
                indicators.sid, indicators.arrived, refresh=refresh, first=not indicators.first_accepted
            )
        except BaseException:
            self._forget(indicators)
            raise
        indicators.first_accepted = indicators.first_accepted or accepted
        indicators.k += 1
        self._next(indicators)

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


def _cancel(indicators: _Indicators) -> None:
    if indicators.pending is not None:
        indicators.pending.cancel()


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
