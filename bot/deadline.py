"""The deadline race, in one place: start the AI run, wait until the deadline, answer inline or hold.

The webhook and the run meet at a `Handoff`. If the run offers its answer before the deadline, the webhook
returns it as TwiML. At the deadline the webhook closes the handoff and returns the holding message; the run
(never cancelled by this) then delivers its answer as a follow-up. Whichever happens first wins; the event
loop runs one of them at a time, so there is no window in which an answer could be taken by neither. A webhook
cancelled after the answer was offered (the server stopping) gives it back, and the run sends it as a follow-up.

When every model slot is taken (WABOT_MAX_CONCURRENT_RUNS), the run is queued and the webhook does not wait
for a deadline it cannot meet: the user gets the busy holding reply at once and the answer follows.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol

from opentelemetry import trace
from structlog.typing import FilteringBoundLogger

from bot.inbound import InboundMessage
from bot.settings import Settings
from bot.splitting import split_message
from bot.store import OwedReply
from bot.typing_indicator import TypingIndicators
from telemetry import metrics, spend
from telemetry.privacy import UserHasher
from telemetry.tracing import ActiveSpan


@dataclass(frozen=True)
class RunResult:
    """What a run has for the user: the answer's parts, or the apology's when the run failed (`kind` says which).
    The webhook returns it inline if it comes in time; otherwise it is journaled and sent as a follow-up."""

    parts: list[str]
    kind: str  # "answer" | "apology"
    tool_count: int = 0
    error_type: str | None = None
    spent: spend.RunUsage | None = None  # the run's model usage (None: no model run, e.g. a journaled answer)
    new_conversation: bool = False  # the run started the user's conversation (none, or it had expired)


class Handoff:
    """Where a run hands its answer to the webhook that is waiting for it, if it still is.

    Two steps, so an answer cannot fall between them: the run offers its answer, then waits to learn whether the
    webhook took it (it goes back as TwiML) or gave it back (the webhook was cancelled before it could return it,
    e.g. at shutdown), in which case the run delivers it as a follow-up. The webhook settles it without awaiting
    anything, so the run waits at most one turn of the event loop.
    """

    __slots__ = ("_answer", "_closed", "_taken")

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self._answer: asyncio.Future[RunResult] = loop.create_future()
        self._taken: asyncio.Future[bool] = loop.create_future()
        self._closed = False

    def offer(self, answer: RunResult) -> bool:
        """Called by the run. True: the webhook is waiting and returns the answer inline, unless it gives it back
        (`taken` says which). False: nobody waits; deliver it as a follow-up."""
        if self._closed:
            return False
        self._answer.set_result(answer)
        return True

    async def taken(self) -> bool:
        """After an accepted `offer`: True once the webhook took the answer, False if it gave it back."""
        return await self._taken

    def close(self) -> RunResult | None:
        """Called by the webhook when it stops waiting. Takes an answer that arrived in time, if any; otherwise
        the run now owes a follow-up."""
        if self._closed:
            return None
        self._closed = True
        if self._answer.done():
            if not self._taken.done():  # done already if the run was cancelled while it waited
                self._taken.set_result(True)
            return self._answer.result()
        metrics.FOLLOWUPS_PENDING.inc()
        # Nobody waits on either future any more (`offer` now says no): the run, which may wait on the model for
        # minutes, need not keep them.
        del self._answer, self._taken
        return None

    def give_back(self) -> None:
        """Called by a webhook that is cancelled: nobody returns an answer inline, not even one already offered."""
        if self._closed:
            return
        self._closed = True
        if self._answer.done() and not self._taken.done():
            self._taken.set_result(False)
        metrics.FOLLOWUPS_PENDING.inc()

    async def wait(self, timeout: float) -> None:
        """Until the answer is offered or `timeout` seconds have passed; `close` then says which."""
        if timeout > 0:
            await asyncio.wait((self._answer,), timeout=timeout)


@dataclass(frozen=True)
class WebhookReply:
    """What the webhook returns as TwiML, and how its deadline race went (`outcome`, a metric label)."""

    parts: list[str]
    outcome: str  # "ok" | "timeout" | "error" | "busy"
    tool_count: int = 0


class RunStarter(Protocol):
    """What the deadline race needs of the runs (`bot/replies.py`): start one, and their cap (for the busy log)."""

    @property
    def max_concurrent(self) -> int: ...

    async def start(self, reply: OwedReply, handoff: Handoff) -> bool:
        """Start the run answering `reply`; True when it got a model slot at once."""
        ...


class DeadlineResponder:
    """Answers one accepted message within the reply deadline."""

    def __init__(
        self,
        settings: Settings,
        runner: RunStarter,
        tracer: trace.Tracer,
        log: FilteringBoundLogger,
        typing: TypingIndicators | None = None,
    ) -> None:
        self._typing = typing
        self._timeout = settings.reply_timeout
        self._holding = split_message(settings.holding_message)
        self._busy = split_message(settings.busy_message)
        self._log_bodies = settings.log_message_bodies
        self._hasher = UserHasher(settings.hash_key_value())  # keyed fingerprints of bodies when they are not logged
        self._runner = runner
        self._tracer = tracer
        self._log = log

    async def respond(self, message: InboundMessage, reply: OwedReply, arrived: float) -> WebhookReply:
        """Race the run against the deadline (counted from `arrived`, a time.monotonic() stamp)."""
        with ActiveSpan(
            self._tracer,
            "wabot.reply",
            attributes={"wabot.reply.timeout_s": self._timeout, "wabot.user.hash": reply.user_key},
            record_exception=True,
        ) as span:
            handoff = Handoff()
            try:
                started = await self._runner.start(reply, handoff)
                if started:
                    # "typing…" for the user, in a task of its own: nothing here waits for it (bot/typing_indicator.py).
                    if self._typing is not None:
                        self._typing.begin(reply.sid, arrived)
                    await handoff.wait(arrived + self._timeout - time.monotonic())
            except BaseException:
                # Cancelled (the server stopping): the run must deliver its answer itself.
                handoff.give_back()
                raise
            answer = handoff.close()
            if not started:
                result = self._busy_reply(message)
                span.set_attributes({"wabot.reply.outcome": result.outcome, "wabot.reply.parts": len(result.parts)})
                return result
            elapsed = time.monotonic() - arrived
            result = self._settle(message, answer, elapsed)
            if result.outcome == "timeout" and self._typing is not None:
                self._typing.held(reply.sid, arrived)  # the holding reply clears "typing…": show it again after it
            span.set_attributes(
                {
                    "wabot.reply.outcome": result.outcome,
                    "wabot.reply.elapsed_s": round(elapsed, 4),
                    "wabot.reply.parts": len(result.parts),
                }
            )
            return result

    def _busy_reply(self, message: InboundMessage) -> WebhookReply:
        metrics.AI_RUNS.labels(outcome="busy").inc()
        self._log.warning(
            "runs_at_capacity",
            message_sid=message.sid,
            max_concurrent_runs=self._runner.max_concurrent,
            user_msg=message.body[:80] if self._log_bodies else self._hasher.fingerprint(message.body),
        )
        return WebhookReply(parts=self._busy, outcome="busy")

    def _settle(self, message: InboundMessage, answer: RunResult | None, elapsed: float) -> WebhookReply:
        metrics.observe(metrics.AI_PROCESSING, elapsed)
        if answer is None:
            metrics.AI_RUNS.labels(outcome="timeout").inc()
            self._log.warning(
                "ai_timeout",
                message_sid=message.sid,
                elapsed_seconds=round(elapsed, 3),
                timeout_seconds=self._timeout,
                user_msg=message.body[:80] if self._log_bodies else self._hasher.fingerprint(message.body),
            )
            return WebhookReply(parts=self._holding, outcome="timeout")
        outcome = "ok" if answer.kind == "answer" else "error"
        metrics.AI_RUNS.labels(outcome=outcome).inc()
        if answer.kind == "answer":
            metrics.REPLY_PARTS.inc(len(answer.parts))
        return WebhookReply(parts=answer.parts, outcome=outcome, tool_count=answer.tool_count)
