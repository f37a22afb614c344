"""The FastAPI application: routes, lifespan, and a server span for every traced request."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from opentelemetry.sdk.trace.export import SpanExporter

from bot import __version__, health, webhook
from bot.arrival import WabotApp
from bot.services import Services
from bot.settings import Settings
from telemetry.server_spans import fastapi_telemetry
from telemetry.tracing import setup_tracing

if TYPE_CHECKING:
    from bot.demo.runner import Demo


def create_app(
    settings: Settings,
    *,
    span_exporter: SpanExporter | None = None,
    demo: Demo | None = None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """Build the app. `span_exporter` replaces the OTLP exporter (tests read spans from memory); `clock`, the
    wall clock that places per-user rate-limit windows, is one the tests drive.

    `demo`, the running demo's simulator and sink, adds the chat page (/) and /status to this port; without it
    neither exists here (in production /status is on the metrics port only, which is never public).
    """
    tracing = setup_tracing(settings, span_exporter, version=__version__)
    chat = None
    if demo is not None:
        from bot.demo.chat import ChatHub

        chat = ChatHub(settings, demo)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = await Services.start(settings, tracing, clock)
        # The serving process's hook (bot/server.py: the GC policy's freeze after the warm-up, and its watcher).
        on_started = getattr(app.state, "on_started", None)
        if on_started is not None:
            on_started(app.state.services)
        if chat is not None:
            chat.start()
        try:
            yield
        finally:
            if chat is not None:
                await chat.stop()
            await app.state.services.stop()

    app = WabotApp(
        title="wabot",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        telemetry=fastapi_telemetry(tracing),
    )
    app.state.settings = settings
    app.state.chat = chat
    app.include_router(webhook.router)
    app.include_router(health.router)
    if chat is not None:
        from bot import status
        from bot.demo import chat as chat_page

        app.include_router(chat_page.router)
        app.include_router(status.router)
    return app


def begin_shutdown(app: FastAPI) -> None:
    """A stop signal arrived: end the responses that never end by themselves (the chat page's event streams), so
    uvicorn's graceful shutdown waits only for webhooks."""
    chat = getattr(app.state, "chat", None)
    if chat is not None:
        chat.close_streams()
