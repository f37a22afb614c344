"""The FastAPI application: routes, lifespan, and tracing of every request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace.export import SpanExporter

from bot import __version__, health, webhook
from bot.services import Services
from bot.settings import Settings
from telemetry.tracing import setup_tracing


def create_app(settings: Settings, *, span_exporter: SpanExporter | None = None) -> FastAPI:
    """Build the app. `span_exporter` replaces the OTLP exporter (tests read spans from memory)."""
    tracing = setup_tracing(settings, span_exporter)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = await Services.start(settings, tracing)
        try:
            yield
        finally:
            await app.state.services.stop()

    app = FastAPI(
        title="wabot", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.include_router(webhook.router)
    app.include_router(health.router)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=tracing.provider, excluded_urls="healthz,readyz")
    return app
