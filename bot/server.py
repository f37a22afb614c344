"""Running the bot: the webhook app under uvicorn and the metrics endpoint on its own port."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

import uvicorn
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


def serve(settings: Settings, *, host: str, port: int, metrics_port: int) -> None:
    """Serve until SIGTERM/SIGINT, then finish in-flight webhooks and leave owed replies journaled."""
    metrics_server = start_metrics_server(settings, metrics_port)
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        # In-flight webhooks finish within the reply deadline; give them that long after SIGTERM.
        timeout_graceful_shutdown=int(settings.reply_timeout) + 2,
    )
    try:
        uvicorn.Server(config).run()
    finally:
        metrics_server.shutdown()
