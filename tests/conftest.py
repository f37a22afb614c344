"""Shared test harness: the OpenAI simulator and Twilio sink on loopback, and real bots served over HTTP.

Every bot runs the real app under uvicorn in its own thread and event loop; tests talk to it over HTTP with
requests signed by twilio's own validator, exactly as Twilio would.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import random
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from xml.etree import ElementTree

import httpx2
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY
from pydantic import SecretStr
from twilio.request_validator import RequestValidator

from bot.app import create_app
from bot.demo.inbound_form import inbound_form, new_message_sid
from bot.demo.loopback import LoopbackServer
from bot.demo.openai_simulator import OpenAISimulator
from bot.demo.twilio_sink import TwilioSink
from bot.gc_policy import GcPolicy
from bot.settings import Settings
from bot.tls import tls_context
from telemetry.logging import setup_logging
from tests.waiting import wait_until

# The tests' HTTP clients, which all speak plain HTTP to 127.0.0.1, share the process's one TLS context (bot/tls.py)
# with the bots started in this process: httpx2 otherwise builds one per client, loading the CA bundle each time
# (about 50 ms of CPU).
CLIENT_TLS = tls_context()

ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "test-auth-token"
BOT_NUMBER = "whatsapp:+14155238886"


_PORTS = random.Random()  # its own generator: hypothesis and the tests' seeds must not make two runs pick alike
_PORT_RANGE = (20_000, 32_000)


def _worker_ports() -> range:
    """This process's share of the port range: under pytest-xdist each worker picks from its own slice, so two
    workers never probe the same port in the moment between a check and a server's bind."""
    low, high = _PORT_RANGE
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    size = (high - low) // max(count, 1)
    start = low + int(worker or 0) % max(count, 1) * size
    return range(start, start + size)


def free_port() -> int:
    """A port free on 127.0.0.1 now, chosen below the kernel's ephemeral range (32768-60999 here); the suite's one
    way to pick a port for a server it starts (its own or Prometheus', Alertmanager's, Redis', a subprocess bot's).

    Binding port 0 would pick from that range, where every outgoing connection of the suite also takes its local
    port: one of them can grab the port between this check and the server's bind (seen in CI as EADDRINUSE).
    """
    ports = _worker_ports()
    for _ in range(200):
        port = _PORTS.choice(ports)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {ports.start} and {ports.stop} on 127.0.0.1")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Under pytest-xdist, a test marked `exclusive` (it loads every core: a thousand users at once) runs while no
    other worker runs a test, so no deadline elsewhere is measured on a machine it saturates; the others run side
    by side. Setup and teardown (module servers included) count as part of the test; so does none of the wait."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:  # one process: tests never overlap
        yield
        return
    exclusive = item.get_closest_marker("exclusive") is not None
    base = Path(tempfile.gettempdir()) / f"wabot-tests-{run}"
    # A turnstile before the lock itself: once an exclusive test waits, no new test starts until it has run.
    with open(f"{base}.turnstile", "a") as turnstile, open(f"{base}.lock", "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(turnstile, fcntl.LOCK_UN)


# The modules that take longest (per-test wall and CPU time measured on 2 cores, slowest first): started first, so
# that under pytest-xdist no worker is left finishing one of them alone while the others are done.
LONG_FIRST = (
    "test_memory",
    "test_fuzz_webhook",
    "test_end_to_end_alerts",
    "test_alert_rules",
    "test_replicas",
    "test_status",
    "test_metrics",
    "test_otlp_encoding",
    "test_replies",
    "test_security",
    "test_lifecycle",
)


# The tests that keep a core busy from start to end (measured: CPU time ≈ wall time), in this process: under
# pytest-xdist they form one group, run one after another on one worker, so that at most one of them loads a core
# at any moment. Most other tests wait (for a deadline, a retry, Prometheus) far more than they compute: `make test`
# runs two workers per core, and the extra workers' share is what the others would spend waiting.
CPU_BOUND = {
    ("test_memory", "test_reply_path_leaves_the_heap_flat"),
    ("test_fuzz_webhook", "test_memory_stays_flat_over_hundreds_of_hostile_requests"),
    ("test_otlp_encoding", "test_the_encoding_is_the_librarys_for_any_span"),
    ("test_otlp_encoding", "test_spans_read_through_their_public_properties_encode_the_same"),
}


def _shares_a_module_fixture(item: pytest.Item) -> bool:
    """The test uses a module-scoped fixture (a Prometheus, a browser, a demo process): its module then runs on one
    pytest-xdist worker, which builds that fixture once, instead of on every worker that gets one of its tests."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(d.scope == "module" for defs in info.name2fixturedefs.values() for d in defs)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """LONG_FIRST's modules first, in its order, each kept whole (its module fixtures set up once); the rest after,
    in their order. A module not listed keeps its place among the rest. CPU_BOUND's tests in xdist group "cpu"."""
    for item in items:
        if (item.path.stem, getattr(item, "originalname", item.name)) in CPU_BOUND:
            item.add_marker(pytest.mark.xdist_group("cpu"))
        elif _shares_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: each module's order stays


def pytest_collection_finish() -> None:
    """What collection built (every test module, the bot and the libraries they import) lives as long as the worker:
    frozen, the collector's full passes never walk it again (each walked hundreds of thousands of objects unfrozen:
    docs/benchmarks.md, section 7)."""
    GcPolicy.freeze()


new_sid = new_message_sid


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    """Current value of a sample in this process's registry (0 when absent)."""
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


class LogLines(io.TextIOBase):
    """A thread-safe text stream keeping every JSON log line the process writes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = ""
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        with self._lock:
            self._buffer += text
            *complete, self._buffer = self._buffer.split("\n")
            self.lines.extend(line for line in complete if line)
        return len(text)

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            lines = self.lines[since:]
        return [json.loads(line) for line in lines if line.startswith("{")]

    def mark(self) -> int:
        with self._lock:
            return len(self.lines)


@pytest.fixture(scope="session")
def log_lines() -> LogLines:
    lines = LogLines()
    setup_logging("debug", stream=lines)
    return lines


@pytest.fixture(scope="session")
def simulator() -> Iterator[tuple[OpenAISimulator, str]]:
    sim = OpenAISimulator(mode="instant", seed=7, echo=True)
    server = LoopbackServer(sim.app, name="openai-simulator")
    url = server.start()
    yield sim, url
    sim.shutdown()
    server.stop()


@pytest.fixture(scope="session")
def sink_server() -> Iterator[tuple[TwilioSink, str]]:
    sink = TwilioSink(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, status_callbacks=True)
    server = LoopbackServer(sink.app, name="twilio-sink")
    url = server.start()
    sink.api_url = url
    yield sink, url
    sink.shutdown()
    server.stop()


@pytest.fixture
def sim(simulator: tuple[OpenAISimulator, str]) -> OpenAISimulator:
    simulator[0].set_mode("instant")
    simulator[0].clear_calls()
    return simulator[0]


@pytest.fixture
def sink(sink_server: tuple[TwilioSink, str]) -> TwilioSink:
    sink_server[0].clear()
    sink_server[0].clear_faults()
    return sink_server[0]


@dataclass
class Posted:
    status: int
    text: str
    headers: dict[str, str]
    elapsed: float

    @property
    def messages(self) -> list[str]:
        return [m.text or "" for m in ElementTree.fromstring(self.text).iter("Message")]


@dataclass
class Bot:
    """A running bot and the ways a test talks to it."""

    url: str
    settings: Settings
    spans: InMemorySpanExporter
    server: LoopbackServer
    client: httpx2.Client = field(default_factory=lambda: httpx2.Client(timeout=60.0, verify=CLIENT_TLS))

    def sign(self, path: str, form: dict[str, str], *, token: str = AUTH_TOKEN, base: str | None = None) -> str:
        return RequestValidator(token).compute_signature(f"{base or self.settings.public_url}{path}", form)

    def form(self, body: str, *, sender: str = "+15550001111", sid: str | None = None, **extra: str) -> dict[str, str]:
        form = inbound_form(body, sender=sender, to=BOT_NUMBER, account_sid=ACCOUNT_SID, sid=sid)
        return {**form, **extra}

    def post_form(
        self,
        form: dict[str, str] | None,
        *,
        path: str = "/whatsapp",
        signature: str | None = None,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> Posted:
        body = content if content is not None else urlencode(form or {}).encode()
        sent_headers = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        if signature is None and form is not None:
            signature = self.sign(path, form)
        if signature:
            sent_headers["X-Twilio-Signature"] = signature
        started = time.monotonic()
        response = self.client.post(f"{self.url}{path}", content=body, headers=sent_headers)
        return Posted(response.status_code, response.text, dict(response.headers), time.monotonic() - started)

    def send(self, body: str, **kwargs: Any) -> Posted:
        return self.post_form(self.form(body, **kwargs))

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Bounded poll of /readyz until no run is in flight."""

        wait_until(
            lambda: self.client.get(f"{self.url}/readyz").json().get("runs_in_flight") == 0, timeout, "no run in flight"
        )

    def stop(self) -> None:
        self.client.close()
        self.server.stop()


@pytest.fixture
def make_bot(
    simulator: tuple[OpenAISimulator, str],
    sink_server: tuple[TwilioSink, str],
    tmp_path: Path,
    log_lines: LogLines,
) -> Iterator[Callable[..., Bot]]:
    bots: list[Bot] = []

    def start(
        port: int | None = None,
        store: str | None = None,
        memory_spans: bool = True,
        clock: Callable[[], float] = time.time,
        start_timeout: float = 10.0,
        **overrides: Any,
    ) -> Bot:
        """`memory_spans=False` leaves span export to the settings (OTLP, none), as in production; `clock` places
        the rate-limit windows (a `tests.clock.DrivenClock` lets a test move time instead of waiting)."""
        port = port or free_port()
        url = f"http://127.0.0.1:{port}"
        values: dict[str, Any] = {
            "openai_api_key": SecretStr("test-key"),
            "openai_base_url": f"{simulator[1]}/v1",
            "model": "sim-model",
            "twilio_account_sid": ACCOUNT_SID,
            "twilio_auth_token": SecretStr(AUTH_TOKEN),
            "twilio_whatsapp_from": BOT_NUMBER,
            "twilio_api_url": sink_server[1],
            "public_url": url,
            "store": store or f"sqlite:///{tmp_path}/wabot-{port}.db",
            "reply_timeout": 1.0,
            "followup_timeout": 10.0,
            "otel_traces_exporter": "none",
        }
        values.update(overrides)
        settings = Settings.model_construct(**{**Settings(_env_file=None).model_dump(), **values})
        spans = InMemorySpanExporter()
        app = create_app(settings, span_exporter=spans if memory_spans else None, clock=clock)
        server = LoopbackServer(app, port=port, name=f"wabot-{port}")
        server.start(timeout=start_timeout)
        bot = Bot(url=url, settings=settings, spans=spans, server=server)
        bots.append(bot)
        return bot

    yield start
    for bot in bots:
        bot.stop()


@pytest.fixture
def bot(make_bot: Callable[..., Bot]) -> Bot:
    return make_bot()
