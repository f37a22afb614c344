"""The handoff between a webhook and its run: every answer goes back inline or is delivered by the run, never neither.

The window these tests cover (the webhook cancelled in the same turn of the event loop in which the run offers its
answer, e.g. when the server stops) cannot be hit on purpose through HTTP, so they drive the real
`DeadlineResponder` and `Handoff` with a stand-in for the run that offers its answer at a chosen moment.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from bot.deadline import DeadlineResponder, Handoff, RunResult
from bot.inbound import InboundMessage
from bot.settings import DEFAULT_HOLDING_MESSAGE, Settings
from bot.store import OwedReply
from telemetry.logging import get_logger
from tests.conftest import metric

MESSAGE = InboundMessage(sid="SM" + "1" * 32, sender="whatsapp:+15550001111", to="whatsapp:+14155238886", body="hi")
REPLY = OwedReply(sid=MESSAGE.sid, to=MESSAGE.sender, user_key="u", prompt="hi", arrived_at=time.time())
ANSWER = RunResult(parts=["hello"], kind="answer")


class OfferingRun:
    """Stands in for the run: once started, it offers ANSWER when `go` is set, and keeps what the handoff said."""

    max_concurrent = 1

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.taken_inline: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.before_offer: list[Any] = []
        self.started = asyncio.Event()

    async def start(self, _reply: OwedReply, handoff: Handoff) -> bool:
        async def run() -> None:
            await self.go.wait()
            for step in self.before_offer:
                step()
            self.taken_inline.set_result(handoff.offer(ANSWER) and await handoff.taken())

        self._task = asyncio.create_task(run())
        self.started.set()
        return True


def responder(run: OfferingRun, timeout: float) -> DeadlineResponder:
    settings = Settings(reply_timeout=timeout)
    return DeadlineResponder(settings, run, TracerProvider().get_tracer("test"), get_logger())


def respond(run: OfferingRun, timeout: float) -> asyncio.Task:
    return asyncio.create_task(responder(run, timeout).respond(MESSAGE, REPLY, time.monotonic()))


def test_answer_in_time_goes_back_inline_and_the_run_is_told() -> None:
    async def scenario() -> None:
        run = OfferingRun()
        webhook = respond(run, timeout=5.0)
        run.go.set()
        reply = await asyncio.wait_for(webhook, 5)
        assert reply.parts == ["hello"] and reply.outcome == "ok"
        assert await asyncio.wait_for(run.taken_inline, 1) is True

    asyncio.run(scenario())


def test_answer_after_the_deadline_is_left_to_the_run() -> None:
    async def scenario() -> None:
        run = OfferingRun()
        pending = metric("wabot_followups_pending")
        reply = await asyncio.wait_for(respond(run, timeout=0.05), 5)
        assert reply.parts == [DEFAULT_HOLDING_MESSAGE] and reply.outcome == "timeout"
        assert metric("wabot_followups_pending") == pending + 1
        run.go.set()
        assert await asyncio.wait_for(run.taken_inline, 1) is False

    asyncio.run(scenario())


def test_webhook_cancelled_as_the_answer_is_offered_gives_it_back_to_the_run() -> None:
    """Before the fix the run was told "taken" and dropped the answer, which the cancelled webhook never returned."""

    async def scenario() -> None:
        run = OfferingRun()
        pending = metric("wabot_followups_pending")
        webhook = respond(run, timeout=5.0)
        run.before_offer.append(webhook.cancel)  # the same turn of the loop as the offer
        run.go.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(webhook, 5)
        assert await asyncio.wait_for(run.taken_inline, 1) is False
        assert metric("wabot_followups_pending") == pending + 1

    asyncio.run(scenario())


def test_webhook_cancelled_while_waiting_leaves_the_answer_to_the_run() -> None:
    async def scenario() -> None:
        run = OfferingRun()
        webhook = respond(run, timeout=5.0)
        await run.started.wait()
        webhook.cancel()  # lands where the webhook next waits: for the answer
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(webhook, 5)
        run.go.set()
        assert await asyncio.wait_for(run.taken_inline, 1) is False

    asyncio.run(scenario())
