"""The bot's long-lived parts, built once at start-up and shared by every request (FastAPI dependency)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request
from openai import AsyncOpenAI
from prometheus_client import multiprocess
from structlog.typing import FilteringBoundLogger

from bot import __version__
from bot.agent import Agent, make_client
from bot.deadline import DeadlineResponder
from bot.followup import FollowupDelivery
from bot.media import MediaReader
from bot.media_fetch import MediaFetcher
from bot.outbound import TwilioSender
from bot.replies import ReplyRunner
from bot.settings import Settings
from bot.signature import SignatureChecker
from bot.store import Store, open_store
from bot.tools import registry
from bot.typing_indicator import TypingIndicators
from bot.warmup import warm_up_openai
from telemetry import metrics, spend
from telemetry.flood import RejectionThrottle
from telemetry.logging import get_logger
from telemetry.privacy import UserHasher
from telemetry.recent import RecentActivity
from telemetry.tracing import Tracing


@dataclass
class Services:
    settings: Settings
    tracing: Tracing
    store: Store
    openai: AsyncOpenAI
    sender: TwilioSender
    runner: ReplyRunner
    responder: DeadlineResponder
    signature: SignatureChecker
    hasher: UserHasher
    log: FilteringBoundLogger
    recent: RecentActivity
    media_fetcher: MediaFetcher
    typing: TypingIndicators
    rejections: RejectionThrottle = field(default_factory=RejectionThrottle)
    background: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(cls, settings: Settings, tracing: Tracing, clock: Callable[[], float] = time.time) -> Services:
        """Open the store, build the clients, and resume replies a previous process left owing. `clock` places
        the per-user rate-limit windows and the rejections' one-second log windows, and ages conversations (tests
        drive it)."""
        log = get_logger("wabot")
        metrics.init(
            __version__,
            settings.reply_timeout,
            max_concurrent_runs=settings.max_concurrent_runs,
            multiprocess_dir=settings.prometheus_multiproc_dir,
        )
        spend.configure(settings.price_table, models=(settings.model, settings.transcribe_model))
        metrics.DAILY_BUDGET.set(settings.daily_budget_usd)
        metrics.USER_DAILY_TOKENS.set(settings.user_daily_tokens)
        store = await open_store(
            settings.store,
            dedupe_ttl_s=settings.dedupe_ttl_s,
            lease_s=settings.redis_lease_s,
            clock=clock,
            conversation_ttl_s=settings.conversation_ttl_s,
        )
        client = make_client(settings)
        sender = TwilioSender(settings, tracing.tracer)
        agent = Agent(client, settings, registry, tracing.tracer)
        recent = RecentActivity()
        typing = TypingIndicators(sender.client, settings, tracing.tracer, log, recent)
        followups = FollowupDelivery(store, sender, log, recent, give_up_s=settings.followup_give_up_s)
        media_fetcher = MediaFetcher(settings)
        media = MediaReader(settings, client, media_fetcher, tracing.tracer, log, recent)
        runner = ReplyRunner(settings, store, agent, followups, log, media=media, typing=typing)
        services = cls(
            settings=settings,
            tracing=tracing,
            store=store,
            openai=client,
            sender=sender,
            runner=runner,
            responder=DeadlineResponder(settings, runner, tracing.tracer, log, typing),
            signature=SignatureChecker(
                settings.secret("twilio_auth_token"),
                settings.public_url,
                settings.secret("twilio_signing_key"),
            ),
            hasher=UserHasher(settings.hash_key_value()),
            log=log,
            recent=recent,
            media_fetcher=media_fetcher,
            typing=typing,
            rejections=RejectionThrottle(clock=clock),
        )
        # Before the first webhook and the first resumed run: neither should pay for the SDK's first call.
        await warm_up_openai(registry.specs())
        await runner.resume_orphans()
        interval = getattr(store, "takeover_interval_s", None)
        if interval:
            services.background.append(asyncio.create_task(runner.watch_orphans(interval), name="watch orphans"))
        return services

    async def stop(self) -> None:
        """Stop runs (their replies stay journaled for the next start) and close every connection."""
        for task in self.background:
            task.cancel()
        await self.runner.cancel_all()
        await self.typing.close()
        await self.sender.close()
        await self.media_fetcher.close()
        await self.openai.close()
        await self.store.close()
        self.tracing.shutdown()
        if self.settings.prometheus_multiproc_dir:
            # Live gauges (pending follow-ups) of a stopped worker must stop counting.
            multiprocess.mark_process_dead(os.getpid())


async def get_services(request: Request) -> Services:
    """FastAPI dependency: the running app's services (async: FastAPI runs a plain `def` dependency in a thread
    pool, a thread hop per request for a dictionary lookup)."""
    services: Services = request.app.state.services
    return services
