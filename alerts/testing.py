"""Test helpers for the alerting stack: a local webhook receiver and a test copy of alerts/alertmanager.yml.

Used by tests/test_alertmanager.py and meant for end-to-end tests (Prometheus -> Alertmanager -> receiver):

    receiver = LocalReceiver().start()
    config = alertmanager_test_config(ALERTMANAGER_CONFIG, receiver.url)   # from the real file, by code
    ...
    notes = receiver.wait_for(lambda n: n.receiver == "page", timeout=10)

Standard library and PyYAML only; no pytest here.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

ALERTS_DIR = Path(__file__).resolve().parent
ALERTMANAGER_CONFIG = ALERTS_DIR / "alertmanager.yml"


def alertmanager_test_config(
    source: Path,
    receiver_base_url: str,
    *,
    group_wait: str = "500ms",
    group_interval: str = "1s",
    repeat_interval: str = "1h",
) -> dict[str, Any]:
    """The real Alertmanager config with every webhook URL sent to `receiver_base_url/<receiver name>` and
    every route's timers shortened. Routes, matchers, grouping and inhibit rules stay exactly as deployed."""
    config: dict[str, Any] = copy.deepcopy(yaml.safe_load(source.read_text(encoding="utf-8")))
    base = receiver_base_url.rstrip("/")
    for receiver in config.get("receivers", []):
        hooks = receiver.get("webhook_configs")
        if not hooks:
            raise ValueError(f"receiver {receiver['name']!r} has no webhook_configs to redirect")
        for hook in hooks:
            hook["url"] = f"{base}/{receiver['name']}"
        for key in list(receiver):
            if key.endswith("_configs") and key != "webhook_configs":
                del receiver[key]  # a native integration (pagerduty, slack, ...) must not be called by tests

    def shorten(route: dict[str, Any]) -> None:
        for key, value in (
            ("group_wait", group_wait),
            ("group_interval", group_interval),
            ("repeat_interval", repeat_interval),
        ):
            if key in route or route is config["route"]:
                route[key] = value
        for child in route.get("routes", []):
            shorten(child)

    shorten(config["route"])
    return config


@dataclass(frozen=True)
class Notification:
    receiver: str  # the path the notification was posted to: the receiver's name
    payload: dict[str, Any]  # Alertmanager's webhook body (version 4)

    @property
    def alertnames(self) -> set[str]:
        return {alert["labels"].get("alertname", "") for alert in self.payload.get("alerts", [])}

    @property
    def alerts(self) -> list[dict[str, Any]]:
        return list(self.payload.get("alerts", []))


class LocalReceiver:
    """An HTTP server on 127.0.0.1 that records every POST body as a Notification."""

    def __init__(self) -> None:
        self.notifications: list[Notification] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                try:
                    payload = json.loads(body or b"{}")
                except json.JSONDecodeError:
                    payload = {"invalid_json": body.decode("utf-8", "replace")}
                receiver._record(Notification(self.path.strip("/"), payload))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="alert-receiver", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> LocalReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _record(self, notification: Notification) -> None:
        with self._changed:
            self.notifications.append(notification)
            self._changed.notify_all()

    def received(self, receiver: str | None = None) -> list[Notification]:
        with self._changed:
            return [n for n in self.notifications if receiver is None or n.receiver == receiver]

    def wait_for(self, predicate: Callable[[Notification], bool], timeout: float) -> Notification:
        """The first recorded notification matching `predicate`, waiting up to `timeout` seconds for it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for notification in self.notifications:
                    if predicate(notification):
                        return notification
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [(n.receiver, sorted(n.alertnames)) for n in self.notifications]
                    raise TimeoutError(f"no matching notification within {timeout} s; received: {seen}")
                self._changed.wait(remaining)
