"""Running the bot: the webhook app under uvicorn (one or several workers), and /metrics + /status on their own port."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import uvicorn
from fastapi import FastAPI
from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app, multiprocess

from bot import status
from bot.app import begin_shutdown, create_app
from bot.gc_policy import GcPolicy
from bot.metrics_http import MetricsServer, WSGIApp
from bot.services import Services
from bot.settings import Settings
from telemetry.recent import RecentActivity

if TYPE_CHECKING:
    from bot.demo.runner import Demo


def metrics_wsgi_app(registry: CollectorRegistry, status_data: Callable[[], dict[str, Any]]) -> WSGIApp:
    """/status (and /status.json) from `status_data`; every other path is prometheus-client's exposition, as before
    (it answers any GET path with the metrics and other methods with 405)."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path not in ("/status", "/status.json") or method not in ("GET", "HEAD"):
            exposition: Iterable[bytes] = metrics_app(environ, start_response)
            return exposition
        query = parse_qs(environ.get("QUERY_STRING", ""))
        body, content_type = status.render(status_data(), status.wants_json(path, query))
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
        start_response("200 OK", headers)
        return [body if method == "GET" else b""]

    return app


def start_metrics_server(
    settings: Settings,
    port: int,
    *,
    recent: Callable[[], RecentActivity | None] = lambda: None,
    workers: int = 1,
    connection_timeout_s: float = 5.0,
) -> MetricsServer:
    """Serve /metrics and /status on `port` (127.0.0.1 unless WABOT_METRICS_HOST says otherwise), in a thread.

    prometheus-client picks OpenMetrics with exemplars when the scraper asks for it. With several workers
    (PROMETHEUS_MULTIPROC_DIR) it aggregates their files instead; exemplars are then not available, and /status
    says that the workers' 5-minute windows cannot be seen from here. `recent` returns the single process's window
    (None until the app has started).
    """
    registry = REGISTRY
    if settings.prometheus_multiproc_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    app = metrics_wsgi_app(registry, lambda: status.collect(settings, recent(), workers=workers))
    # A connection that sends no request within `connection_timeout_s` is closed; threads stay few (metrics_http).
    return MetricsServer(app, settings.metrics_host, port, connection_timeout_s=connection_timeout_s).start()


class _Server(uvicorn.Server):
    """uvicorn, telling the app a stop signal came before uvicorn waits for open responses to finish."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Without this, an open chat page (an endless event stream) would hold the shutdown for the whole grace time.
        begin_shutdown(self._app)
        super().handle_exit(sig, frame)


def tune_gc(app: FastAPI) -> None:
    """Keep the garbage collector's full passes from delaying replies that are due (bot/gc_policy.py).

    A full (generation 2) pass stops the event loop while it walks every tracked object, which takes long with many
    runs in flight, and every holding reply due meanwhile leaves that late (measured in docs/benchmarks.md). The
    allocator no longer starts them; the objects of start-up (imports, the app) and, once the app has started, of
    the warm-up are left out of them for good; and a watcher on the event loop runs them when few runs are in flight.
    """
    policy = GcPolicy()
    policy.take_over()
    policy.freeze()

    def started(services: Services) -> None:
        policy.freeze()
        services.background.append(asyncio.create_task(policy.watch(services.runner.in_flight), name="gc policy"))

    app.state.on_started = started


def worker_app() -> FastAPI:
    """The app of one worker process when serving with several workers (settings come from the environment)."""
    from telemetry.logging import setup_logging

    settings = Settings()
    setup_logging(settings.log_level)
    app = create_app(settings)
    tune_gc(app)
    return app


def _recent_of(app: FastAPI | None) -> Callable[[], RecentActivity | None]:
    def recent() -> RecentActivity | None:
        services = getattr(app.state, "services", None) if app is not None else None
        return services.recent if services is not None else None

    return recent


def serve(
    settings: Settings, *, host: str, port: int, metrics_port: int, workers: int = 1, demo: Demo | None = None
) -> None:
    """Serve until SIGTERM/SIGINT, then finish in-flight webhooks and leave owed replies journaled.

    `demo` (a single worker only) adds the chat page: the demo's simulator and sink live in this process.
    """
    from telemetry.logging import get_logger

    app = create_app(settings, demo=demo) if workers == 1 else None
    if demo is not None:
        log = get_logger("wabot")
        if app is not None:
            log.info("chat_page", url=f"{settings.public_url}/", status=f"{settings.public_url}/status")
        else:
            log.warning("chat_page_disabled", reason="the chat page needs --workers 1", workers=workers)
    metrics_server = start_metrics_server(settings, metrics_port, recent=_recent_of(app), workers=workers)
    options: dict[str, Any] = {
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
        if app is None:
            uvicorn.run("bot.server:worker_app", factory=True, workers=workers, **options)
        else:
            tune_gc(app)
            _Server(uvicorn.Config(app, **options), app).run()
    finally:
        metrics_server.stop()
