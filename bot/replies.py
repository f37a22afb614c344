"""The life of one owed reply, from the user's turn in line to an answer inline or a delivered follow-up.

A run is a task of its own: the webhook returning (or being cancelled) never cancels it. Its budget is the
follow-up timeout counted from the message's arrival; past it the user gets an apology instead of silence.
Runs left in the journal by a crash are started again on start-up (`resume`).

At most WABOT_MAX_CONCURRENT_RUNS runs talk to the model at once. A run that finds every slot taken is still
started: it waits for a slot, and its webhook answers with the busy holding reply at once instead of racing a
deadline it cannot meet.
"""

from __future__ import annotations

import asyncio
import time

from opentelemetry import context as otel_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from structlog.typing import FilteringBoundLogger

from bot.agent import Agent, AgentError
from bot.deadline import Handoff, RunResult
from bot.followup import FollowupDelivery
from bot.media import MediaReader, ReadMedia, model_input
from bot.ordering import Ticket
from bot.settings import Settings
from bot.splitting import split_capped, split_message
from bot.store import OwedReply, Store, guarded
from bot.typing_indicator import TypingIndicators
from telemetry import metrics, spend
from telemetry.tracing import detached_context

# A resumed run gets at least this much time even when its original budget ran out while the bot was down.
_MIN_RESUMED_BUDGET_S = 30.0
# How much longer than a run's budget a message waits for the user's previous one before going ahead anyway.
_ORDER_WAIT_SLACK_S = 60.0
_propagator = TraceContextTextMapPropagator()


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, to journal with a reply so a resumed run joins its trace."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


class ReplyRunner:
    """Starts and tracks runs; each one answers a message and sees its answer delivered."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        agent: Agent,
        followups: FollowupDelivery,
        log: FilteringBoundLogger,
        media: MediaReader | None = None,
        typing: TypingIndicators | None = None,
    ) -> None:
        self._typing = typing
        self._budget = settings.followup_timeout
        self._apology = split_message(settings.apology_message)
        self._apology_text = settings.apology_message
        self._media = media
        self._max_parts = settings.max_reply_parts
        self._user_daily_tokens = settings.user_daily_tokens
        self._store = store
        self._agent = agent
        self._followups = followups
        self._log = log
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(settings.max_concurrent_runs)
        self.max_concurrent = settings.max_concurrent_runs

    async def start(self, reply: OwedReply, handoff: Handoff | None) -> bool:
        """Start the run for `reply` now; the user's place in line is taken before this returns.

        True when the run got a model slot at once; False when it waits for one (every slot is taken).
        """
        try:
            ticket: Ticket | None = await self._store.lanes().ticket_for(reply)
        except Exception as exc:
            # Without the store there is no shared line; answering out of order beats not answering.
            self._log.error("store_error", op="take_ticket", error_type=exc.__class__.__name__)
            ticket = None
        # Taken here, synchronously, not inside the task: a burst of webhooks must see the slots fill up as
        # they arrive, not only once their tasks get to run.
        has_slot = reply.answer_parts is None and not self._slots.locked()
        if has_slot:
            await self._slots.acquire()  # free slot: returns without suspending
            metrics.RUNS_ACTIVE.inc()
        # In a context of its own, callback included (a callback keeps the context it was added in): the run waits
        # on the model long after the webhook's spans ended, and must not keep them (telemetry/tracing.py).
        context = detached_context()
        task = asyncio.create_task(
            self._run(reply, handoff, ticket, has_slot), name=f"reply {reply.sid}", context=context
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard, context=context)
        return has_slot

    async def resume_orphans(self) -> int:
        """Start every run that no live process is working on (left by a crash or a stop); returns how many."""
        owed = await self._store.claim_orphans()
        for reply in owed:
            metrics.FOLLOWUPS_PENDING.inc()
            parent = _propagator.extract({"traceparent": reply.traceparent} if reply.traceparent else {})
            token = otel_context.attach(parent)
            try:
                await self.start(reply, handoff=None)
            finally:
                otel_context.detach(token)
        if owed:
            self._log.info("followups_resumed", count=len(owed), message_sids=[reply.sid for reply in owed])
        return len(owed)

    async def watch_orphans(self, interval_s: float) -> None:
        """Take over, every `interval_s`, the owed replies of replicas whose lease ran out (shared stores)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.resume_orphans()
            except Exception as exc:
                self._log.error("store_error", op="claim_orphans", error_type=exc.__class__.__name__)

    def in_flight(self) -> int:
        return len(self._tasks)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait (bounded) until no run is in flight; True when idle."""
        if not self._tasks:
            return True
        _, still = await asyncio.wait(set(self._tasks), timeout=timeout)
        return not still

    async def cancel_all(self) -> None:
        """Stop every run; their replies stay journaled and are resumed by the next start."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)

    async def _run(self, reply: OwedReply, handoff: Handoff | None, ticket: Ticket | None, has_slot: bool) -> None:
        try:
            if ticket is not None and not await ticket.wait_turn(self._budget + _ORDER_WAIT_SLACK_S):
                self._log.warning("order_wait_timeout", message_sid=reply.sid)
            # An answer journaled by an earlier process: it may have died while Twilio was taking a part of it.
            journaled = reply.answer_parts is not None
            if reply.answer_parts is None:
                # The model's answer, computed while holding a model slot (waiting for one first if needed). Here,
                # not in a coroutine of its own: every frame is held by each run waiting on the model.
                slot_taken, has_slot = has_slot, False  # from here on the finally below releases it
                if not slot_taken:
                    await self._take_slot()
                try:
                    answer = await self._answer(reply, resumed=handoff is None)
                finally:
                    self._release_slot()
                self._stop_typing(reply)
                if handoff is not None and handoff.offer(answer):
                    self._log_answer(reply, answer, phase="inline")
                    if await handoff.taken():
                        await guarded(self._store.drop(reply.sid), self._log, "drop", reply.sid)
                        # After the answer went back: neither the reply nor its journal waits for this bookkeeping.
                        await self._account(reply, answer)
                        return
                    # The webhook was cancelled before it could return the answer: it follows up instead.
                else:
                    self._log_answer(reply, answer, phase="followup")
                await self._account(reply, answer)
                reply.answer_parts, reply.kind = answer.parts, answer.kind
                await guarded(
                    self._store.save_answer(reply.sid, answer.parts, answer.kind), self._log, "save_answer", reply.sid
                )
            try:
                await self._followups.deliver(reply, resumed=journaled)
            finally:
                metrics.FOLLOWUPS_PENDING.dec()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug: the reply stays journaled, so the next start still delivers it.
            self._log.exception("reply_run_failed", message_sid=reply.sid, error_type=exc.__class__.__name__)
        finally:
            self._stop_typing(reply)
            if has_slot:  # the run ended before it used its slot (a resumed answer, a cancellation)
                self._release_slot()
            if ticket is not None:
                await guarded(ticket.release(), self._log, "release_turn", reply.sid)

    async def _take_slot(self) -> None:
        """Wait for a model slot (every one was taken when the run started)."""
        metrics.RUNS_QUEUED.inc()
        try:
            await self._slots.acquire()
        finally:
            metrics.RUNS_QUEUED.dec()
        metrics.RUNS_ACTIVE.inc()

    def _stop_typing(self, reply: OwedReply) -> None:
        """The answer (or apology) is ready to go, or the run ended: "typing…" stops."""
        if self._typing is not None:
            self._typing.stop(reply.sid)

    def _release_slot(self) -> None:
        metrics.RUNS_ACTIVE.dec()
        self._slots.release()

    async def _answer(self, reply: OwedReply, *, resumed: bool) -> RunResult:
        budget = self._budget - (time.time() - reply.arrived_at)
        if resumed:
            budget = max(budget, _MIN_RESUMED_BUDGET_S)
        # Downloads and transcriptions are part of the run: they count against its budget and the deadline.
        read: ReadMedia | None = None
        if reply.media and self._media is not None:
            started = time.monotonic()
            read = await self._media.read(reply.media, budget, reply.sid)
            budget -= time.monotonic() - started
        notices = "\n".join(read.notices) if read is not None else ""
        spent = spend.RunUsage()
        # Added after the model's calls, so the run's usage is reported under the chat model.
        transcriptions = read.costs if read is not None else ()
        if read is not None and not read.readable and not reply.prompt:
            # Nothing for the model: the user's only attachment(s) could not be read, and the reply says why.
            parts, _ = split_capped(notices, self._max_parts)
            _add_all(spent, transcriptions)
            return RunResult(parts=parts, kind="answer", spent=spent)
        previous = await guarded(self._store.get_conversation(reply.user_key), self._log, "get_conversation", reply.sid)
        try:
            result = await self._agent.run(model_input(reply.prompt, read), previous, budget, spent)
        except AgentError as exc:
            _add_all(spent, transcriptions)
            apology = split_message(f"{notices}\n\n{self._apology_text}") if notices else self._apology
            return RunResult(parts=apology, kind="apology", error_type=exc.error_type, spent=spent)
        _add_all(spent, transcriptions)
        if previous is None:
            metrics.CONVERSATIONS.inc()
        await guarded(
            self._store.set_conversation(reply.user_key, result.response_id), self._log, "set_conversation", reply.sid
        )
        # Capped here, before the answer is offered inline or journaled: TwiML and follow-ups send the same parts.
        text = f"{notices}\n\n{result.text}" if notices else result.text
        parts, needed = split_capped(text, self._max_parts)
        if needed > len(parts):
            metrics.ANSWERS_SHORTENED.inc()
            self._log.warning(
                "answer_shortened",
                message_sid=reply.sid,
                parts_needed=needed,
                parts_sent=len(parts),
                answer_chars=len(text),
                max_reply_parts=self._max_parts,
            )
        return RunResult(
            parts=parts, kind="answer", tool_count=result.tool_count, spent=spent, new_conversation=previous is None
        )

    async def _account(self, reply: OwedReply, answer: RunResult) -> None:
        """Log what the run's model calls used and cost (`ai_usage`, the user by hash only) and add its tokens to
        the user's count of the day, which the webhook reads before the next run (WABOT_USER_DAILY_TOKENS)."""
        spent = answer.spent
        if spent is None or spent.calls == 0:
            return
        self._log.info(
            "ai_usage",
            message_sid=reply.sid,
            user_hash=reply.user_key,
            model=spent.model,
            calls=spent.calls,
            input_tokens=spent.input_tokens,
            cached_tokens=spent.cached_tokens,
            output_tokens=spent.output_tokens,
            cost_usd=round(spent.cost_usd, 8),
            priced=spent.priced,
            new_conversation=answer.new_conversation,
            kind=answer.kind,
        )
        if self._user_daily_tokens > 0 and spent.tokens > 0:
            await guarded(self._store.add_tokens(reply.user_key, spent.tokens), self._log, "add_tokens", reply.sid)

    def _log_answer(self, reply: OwedReply, answer: RunResult, *, phase: str) -> None:
        elapsed = round(time.time() - reply.arrived_at, 3)
        if answer.error_type is None:
            self._log.info(
                "ai_processing_time",
                message_sid=reply.sid,
                elapsed_seconds=elapsed,
                tool_count=answer.tool_count,
                phase=phase,
            )
            return
        metrics.AI_ERRORS.labels(phase=phase, error_type=answer.error_type).inc()
        self._log.error(
            "ai_error_in_timeout",
            message_sid=reply.sid,
            error_type=answer.error_type,
            elapsed_seconds=elapsed,
            phase=phase,
        )


def _add_all(spent: spend.RunUsage, calls: tuple[spend.CallCost, ...]) -> None:
    for call in calls:
        spent.add(call)
