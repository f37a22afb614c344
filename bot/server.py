"""Running the bot: the webhook app under uvicorn (one or several workers) and /metrics on its own port."""

from __future__ import annotations

import signal
from wsgiref.simple_server import WSGIServer

import uvicorn
from fastapi import FastAPI
from prometheus_client import REGISTRY, CollectorRegistry, multiprocess, start_http_server

from bot.app import create_app
from bot.settings import Settings


def start_metrics_server(settings: Settings, port: int) -> WSGIServer:
    """Serve /metrics on `port` (127.0.0.1 unless WABOT_METRICS_HOST says otherwise), in a thread.

    prometheus-client picks OpenMetrics with exemplars when the scraper asks for it. With several workers
    (PROMETHEUS_MULTIPROC_DIR) it aggregates their files instead; exemplars are then not available.
    """
    registry = REGISTRY
    if settings.prometheus_multiproc_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    server, _thread = start_http_server(port, addr=settings.metrics_host, registry=registry)
    return server


def worker_app() -> FastAPI:
    """The app of one worker process when serving with several workers (settings come from the environment)."""
    from telemetry.logging import setup_logging

    settings = Settings()
    setup_logging(settings.log_level)
    return create_app(settings)


def serve(settings: Settings, *, host: str, port: int, metrics_port: int, workers: int = 1) -> None:
    """Serve until SIGTERM/SIGINT, then finish in-flight webhooks and leave owed replies journaled."""
    metrics_server = start_metrics_server(settings, metrics_port)
    options = {
        "host": host,
        "port": port,
        "log_config": None,
        "access_log": False,
        "lifespan": "on",
        # In-flight webhooks finish within the reply deadline; give them that long after SIGTERM.
        "timeout_graceful_shutdown": int(settings.reply_timeout) + 2,
    }
    # uvicorn re-raises the SIGTERM it handled once its graceful shutdown is done; with this handler in place
    # that re-raise is a no-op and the process exits 0, telling the supervisor the shutdown was clean.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        if workers > 1:
            uvicorn.run("bot.server:worker_app", factory=True, workers=workers, **options)
        else:
            uvicorn.Server(uvicorn.Config(create_app(settings), **options)).run()
    finally:
        metrics_server.shutdown()
