"""The security review's findings (issue 15, part 2), each tried as an attacker would on 127.0.0.1.

The demo binds to loopback with a per-run token and bounded directives; the metrics port survives idle
connections; a client leaving mid-body is a counted rejection; an unsigned flood costs bounded logs and traces and
cannot pick trace ids; span statuses carry error types, never text; body fingerprints are keyed; the per-user rate
limit holds across SQLite workers; answers are valid XML whatever the model says; the database is private.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode
from xml.etree import ElementTree

import httpx2
import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from pydantic import SecretStr
from twilio.request_validator import RequestValidator

from bot.agent import make_client
from bot.demo.inbound_form import inbound_form
from bot.demo.openai_simulator import DirectiveError, parse_directives
from bot.server import start_metrics_server
from bot.settings import DEFAULT_HOLDING_MESSAGE, Settings
from bot.store.base import OwedReply
from bot.store.sqlite import SQLiteStore
from telemetry.flood import REJECTION_LOGS_PER_SECOND
from telemetry.privacy import UserHasher
from tests.clock import DrivenClock
from tests.conftest import CLIENT_TLS, Bot, LogLines, free_port, metric, new_sid
from tests.forkserver import run_wabot, spawn_bot
from tests.served import listening_on
from tests.waiting import wait_until

REJECTIONS = "wabot_webhook_rejections_total"
PUBLISHED_DEMO_TOKEN = "demo-auth-token-not-secret"  # the token every demo used before: public in the repository
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------- 1. the demo


def _clean_env(**extra: str) -> dict[str, str]:
    leaky = ("OTEL_", "WABOT_", "PROMETHEUS_", "TWILIO_", "OPENAI_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(leaky)}
    return {**env, "OTEL_TRACES_EXPORTER": "none", "PYTHONUNBUFFERED": "1", **extra}


class _Demo:
    """`python -m bot serve --demo` with exactly the arguments given (no --host unless the test says so)."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cwd = tmp
        self.output = tmp / f"demo-{self.port}.log"
        command = [sys.executable, "-m", "bot", "serve", "--demo", "--port", str(self.port)]
        command += ["--metrics-port", str(self.metrics_port), *args]
        env = _clean_env(WABOT_STORE=f"sqlite:///{tmp}/demo-{self.port}.db")
        self.process = spawn_bot(command[3:], cwd=tmp, env=env, output=self.output)  # tests/forkserver.py

    def wait_ready(self, timeout: float = 30.0) -> _Demo:
        wait_until(self._ready, timeout, f"the demo to answer {self.url}/readyz", details=self.output.read_text)
        return self

    def _ready(self) -> bool:
        assert self.process.poll() is None, self.output.read_text()
        try:
            return httpx2.get(f"{self.url}/readyz", timeout=1.0, verify=CLIENT_TLS).status_code == 200
        except httpx2.HTTPError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(timeout=5)


@pytest.fixture
def demo_runs(tmp_path: Path) -> Iterator[Callable[..., _Demo]]:
    started: list[_Demo] = []

    def start(*args: str) -> _Demo:
        demo = _Demo(tmp_path, *args)
        started.append(demo)
        return demo.wait_ready()

    yield start
    for demo in started:
        demo.stop()


def _post_signed(url: str, token: str, body: str) -> httpx2.Response:
    from bot.demo.runner import DEMO_ACCOUNT_SID, DEMO_FROM

    form = inbound_form(body, sender="+15550009999", to=DEMO_FROM, account_sid=DEMO_ACCOUNT_SID)
    signature = RequestValidator(token).compute_signature(f"{url}/whatsapp", form)
    headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature}
    return httpx2.post(f"{url}/whatsapp", content=urlencode(form), headers=headers, timeout=30, verify=CLIENT_TLS)


def test_demo_listens_on_loopback_with_a_token_of_its_own_that_wabot_send_finds(demo_runs, tmp_path: Path) -> None:
    demo = demo_runs()
    assert listening_on(demo.port) == {"127.0.0.1"}
    token_file = tmp_path / ".wabot-demo-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 32 and token != PUBLISHED_DEMO_TOKEN
    # The published token no longer signs anything; the run's own does.
    assert _post_signed(demo.url, PUBLISHED_DEMO_TOKEN, "forged [sim:delay=0]").status_code == 403
    assert _post_signed(demo.url, token, "mine [sim:delay=0]").status_code == 200
    # `wabot send`, run where the demo runs, reads the token from the file.
    sent = run_wabot(
        ["send", "hello there [sim:delay=0] [sim:echo]", "--url", demo.url], cwd=tmp_path, env=_clean_env()
    )
    assert sent.returncode == 0, sent.stderr
    assert "hello there" in sent.stdout
    demo.stop()
    assert not token_file.exists()  # the token dies with its run


def test_demo_on_all_interfaces_says_so_loudly(demo_runs) -> None:
    demo = demo_runs("--host", "0.0.0.0")
    assert listening_on(demo.port) == {"0.0.0.0"}
    text = demo.output.read_text()
    assert "demo_exposed" in text and "WARNING" in text.upper()


@pytest.mark.parametrize(
    "directive",
    ["[sim:long=1000000000]", "[sim:delay=1e9]", "[sim:retry_after=1e9]", "[sim:flaky=500:1000000000]"],
)
def test_simulator_directives_are_capped(directive: str) -> None:
    with pytest.raises(DirectiveError):
        parse_directives(f"hi {directive}")


def test_simulator_directives_within_their_caps_still_work() -> None:
    assert parse_directives("[sim:long=4000] [sim:delay=60] [sim:retry_after=5] [sim:flaky=500:3]").long == 4000


# ---------------------------------------------------------------------------------------- 2. the metrics port


def test_metrics_server_threads_stay_bounded_under_idle_connections_and_it_still_answers() -> None:
    port = free_port()
    settings = Settings(_env_file=None)
    before = threading.active_count()
    server = start_metrics_server(settings, port, connection_timeout_s=1.0)
    idle: list[socket.socket] = []
    try:
        for _ in range(150):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        # One half-sent request too: a slow client must not hold a worker either.
        idle[0].sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        response = httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=10, verify=CLIENT_TLS)
        assert response.status_code == 200 and "python_info" in response.text
        assert time.monotonic() - started < 3.0
        assert threading.active_count() - before <= 6
        # Idle connections are closed after the per-connection timeout.
        idle[1].settimeout(5.0)
        assert idle[1].recv(1) == b""
    finally:
        for sock in idle:
            sock.close()
        server.stop()


# --------------------------------------------------------------------------- 3. a client leaving mid-body


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_client_disconnecting_mid_body_is_a_clean_counted_rejection(bot: Bot, sim, log_lines: LogLines) -> None:
    records = _Records()
    logging.getLogger("uvicorn.error").addHandler(records)
    before = metric(REJECTIONS, {"reason": "disconnected"})
    mark = log_lines.mark()
    try:
        body = urlencode(bot.form("half of a message")).encode()
        head = (
            f"POST /whatsapp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\nX-Twilio-Signature: {bot.sign('/whatsapp', bot.form('x'))}\r\n\r\n"
        ).encode()
        port = int(bot.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(head + body[: len(body) // 2])
        wait_until(lambda: metric(REJECTIONS, {"reason": "disconnected"}) >= before + 1, 10, "the disconnect counted")
    finally:
        logging.getLogger("uvicorn.error").removeHandler(records)
    assert metric(REJECTIONS, {"reason": "disconnected"}) == before + 1
    assert [r.getMessage() for r in records.records if r.exc_info or r.levelno >= logging.ERROR] == []
    lines = log_lines.lines[mark:]
    assert not any("Traceback" in line or "exception" in line.lower() for line in lines), lines
    events = [e for e in log_lines.events(mark) if e.get("event") == "webhook_rejected"]
    assert [e["reason"] for e in events] == ["disconnected"]
    assert sim.calls() == []


# ------------------------------------------------------------------------------- 4. unauthenticated floods


def test_unsigned_flood_counts_exactly_with_bounded_log_lines_and_traces(
    make_bot: Callable[..., Bot], sim, log_lines: LogLines
) -> None:
    clock = DrivenClock()  # the flood within one second of the bot's clock however slow the host, then the next
    bot = make_bot(clock=clock)
    sent = 300
    before = metric(REJECTIONS, {"reason": "signature"})
    mark = log_lines.mark()
    for i in range(sent):
        assert bot.post_form(bot.form(f"forged {i}"), signature="bm90IGEgc2lnbmF0dXJl").status == 403
    assert metric(REJECTIONS, {"reason": "signature"}) == before + sent
    logged = [e for e in log_lines.events(mark) if e.get("event") == "webhook_rejected"]
    assert len(logged) == REJECTION_LOGS_PER_SECOND
    assert all("suppressed" not in e for e in logged)
    # One more in the next second: its line says how many were left out meanwhile.
    clock.advance(1.0)
    assert bot.post_form(bot.form("forged again"), signature="bm90IGEgc2lnbmF0dXJl").status == 403
    logged = [e for e in log_lines.events(mark) if e.get("event") == "webhook_rejected"]
    assert len(logged) == REJECTION_LOGS_PER_SECOND + 1
    assert logged[-1]["suppressed"] == sent - REJECTION_LOGS_PER_SECOND
    # Traces: the rejections that were logged are kept (each log line links to one), the others are not exported.
    wait_until(lambda: len(bot.spans.get_finished_spans()) >= len(logged), 10, "a finished span per logged rejection")
    servers = [s for s in bot.spans.get_finished_spans() if s.name == "POST /whatsapp"]
    assert len(servers) == len(logged)
    assert {format(s.context.trace_id, "032x") for s in servers} == {e["trace_id"] for e in logged}


def test_wabot_analyze_counts_the_rejections_a_line_stands_for() -> None:
    import io
    import json

    from telemetry.analyze import analyze

    lines = [
        {"event": "webhook_rejected", "reason": "signature"},
        {"event": "webhook_rejected", "reason": "signature", "suppressed": 41},
        {"event": "webhook_rejected", "reason": "malformed", "suppressed": "many"},
    ]
    report = analyze(io.StringIO("".join(json.dumps(line) + "\n" for line in lines)))
    assert report.rejections == {"malformed": 1, "signature": 43}


def test_a_callers_traceparent_neither_picks_the_trace_nor_turns_tracing_off(make_bot: Callable[..., Bot], sim) -> None:
    bot = make_bot(reply_timeout=3.0)
    chosen = 0x4BF92F3577B34DA6A3CE929D0E0E4736
    for flags in ("01", "00"):
        bot.spans.clear()
        traceparent = f"00-{chosen:032x}-00f067aa0ba902b7-{flags}"
        posted = bot.post_form(bot.form(f"hi {flags}"), headers={"traceparent": traceparent, "tracestate": "a=b"})
        assert posted.status == 200
        [server] = wait_until(
            lambda: [s for s in bot.spans.get_finished_spans() if s.name == "POST /whatsapp"],
            10,
            f"a server span exported with flags {flags}",
        )
        assert server.context.trace_id != chosen
        assert server.parent is None
        assert server.context.trace_flags.sampled


# ------------------------------------------------------------------------------- 5. text in span statuses


def _span_texts(spans: list[ReadableSpan]) -> list[str]:
    texts = []
    for span in spans:
        texts += [span.name, span.status.description or ""]
        texts += [f"{k}={v}" for k, v in (span.attributes or {}).items()]
        for event in span.events:
            texts += [event.name, *(f"{k}={v}" for k, v in (event.attributes or {}).items())]
    return texts


def test_span_statuses_carry_error_types_not_user_or_vendor_text(
    make_bot: Callable[..., Bot], sim, sink, log_lines: LogLines
) -> None:
    bot = make_bot(reply_timeout=0.5, twilio_max_attempts=1)
    marker = "Mars/SecretMarker4821"
    # A tool error quoting the user's argument, answered inline.
    tool = f'[sim:tool=get_current_time:{{"timezone":"{marker}"}}]'
    assert bot.send(f"what time is it {tool}").status == 200
    # A Twilio 4xx whose message is vendor text, on a follow-up.
    sink.inject(status=400, code=29999)
    assert bot.send("slow one [sim:delay=1]").messages == [DEFAULT_HOLDING_MESSAGE]
    bot.wait_idle()
    wait_until(
        lambda: any(s.name == "twilio.messages.create" for s in bot.spans.get_finished_spans()),
        10,
        "the follow-up's Twilio span",
    )
    spans = list(bot.spans.get_finished_spans())
    texts = _span_texts(spans)
    assert any("SecretMarker" in line for line in [c["text"] for c in sim.calls()])  # the marker was sent
    assert not [t for t in texts if "SecretMarker" in t or "Simulated error" in t]
    errors = {s.attributes.get("error.type") for s in spans if s.attributes and "error.type" in s.attributes}
    assert "ToolError" in errors and "rejected" in errors
    assert any(s.attributes.get("twilio.error_code") == 29999 for s in spans)


# ------------------------------------------------------------------------------ 6. keyed body fingerprints


def test_body_fingerprint_is_keyed() -> None:
    text = "My code is 482913"
    one, other = UserHasher("key-one").fingerprint(text), UserHasher("key-two").fingerprint(text)
    assert one["length"] == other["length"] == len(text)
    assert one != other
    assert one == UserHasher("key-one").fingerprint(text)
    # Without the key nothing recomputes it: not the plain hash, not the no-key fallback.
    digest = next(v for k, v in one.items() if k != "length")
    assert digest not in hashlib.sha256(text.encode()).hexdigest()
    assert one != UserHasher(None).fingerprint(text)


def test_logged_fingerprint_uses_the_bots_hash_key(make_bot: Callable[..., Bot], sim, log_lines: LogLines) -> None:
    bot = make_bot(reply_timeout=0.3, hash_key=SecretStr("the-operators-hash-key"))
    mark = log_lines.mark()
    body = "My code is 482913 [sim:delay=0.6]"
    assert bot.send(body).messages == [DEFAULT_HOLDING_MESSAGE]
    bot.wait_idle()
    [timeout] = [e for e in log_lines.events(mark) if e.get("event") == "ai_timeout"]
    assert timeout["user_msg"] == UserHasher("the-operators-hash-key").fingerprint(body)
    assert timeout["user_msg"] != UserHasher("another-key").fingerprint(body)


# -------------------------------------------------------------------- 7. the rate limit across SQLite workers


def test_rate_limit_count_is_shared_by_every_store_on_the_file(tmp_path: Path) -> None:
    """Each worker process opens its own store on the shared file; two stores here are two workers there."""

    async def scenario() -> list[int]:
        path = str(tmp_path / "shared.db")
        first = await SQLiteStore.open(path, 3600)
        second = await SQLiteStore.open(path, 3600)
        try:
            counts = []
            for store in (first, second, first, second, second):
                counts.append(await store.count_message("user-a", 3600))
            counts.append(await second.count_message("user-b", 3600))
            together = await asyncio.gather(*(s.count_message("user-c", 3600) for s in (first, second) * 5))
            counts.append(max(together))
            assert sorted(together) == list(range(1, 11))
            return counts
        finally:
            await first.close()
            await second.close()

    assert asyncio.run(scenario()) == [1, 2, 3, 4, 5, 1, 10]


def test_rate_limit_holds_across_two_real_workers(tmp_path: Path, simulator, sink_server) -> None:
    from tests.served import ServedBot, bot_env

    limit = 4
    served = ServedBot(
        tmp_path, bot_env(simulator[1], sink_server[1], WABOT_USER_RATE_LIMIT=str(limit)), workers=2
    ).wait_ready()
    try:

        def answered(user: str) -> tuple[int, bool]:
            """How many of 2 * limit + 2 messages from `user` were answered; whether all counted in one minute."""
            started = time.time()
            # A new connection each time, so both workers take some of the messages.
            replies = [
                served.post(served.form(f"m{i} [sim:delay=0]", user), new_connection=True) for i in range(2 * limit + 2)
            ]
            assert all(r.status_code == 200 for r in replies)
            return sum("[turn" in r.text for r in replies), started // 60 == time.time() // 60

        # The limit counts per wall-clock minute: messages that straddled a minute's end are sent again by another
        # user, in the minute that has just begun (instead of waiting for a fresh minute before the first try).
        count, one_minute = answered("+15550707070")
        if not one_minute:
            count, one_minute = answered("+15550707071")
        assert one_minute and count == limit, count
    finally:
        served.stop()


# --------------------------------------------------------------------------------- 8. control characters


FORBIDDEN = "".join(chr(c) for c in range(0x20) if chr(c) not in "\t\n\r") + "\ufffe\uffff"


def test_control_characters_in_an_answer_leave_as_valid_xml_and_clean_rest_text(
    make_bot: Callable[..., Bot], sim, sink
) -> None:
    bot = make_bot(reply_timeout=2.0)
    text = "bell\x07 escape\x1b[0m form\x0c nul\x00 keep\ttab and unit\x1f end"
    posted = bot.post_form(bot.form(text))
    assert posted.status == 200
    [message] = ElementTree.fromstring(posted.text).iter("Message")  # an XML parser accepts it
    assert not any(ch in FORBIDDEN for ch in message.text or "")
    assert "keep\ttab" in (message.text or "") and "bell" in (message.text or "")
    # The same answer as a REST follow-up.
    sink.clear()
    assert bot.send(f"{text} [sim:delay=2.5]", sender="+15550808080").messages == [DEFAULT_HOLDING_MESSAGE]
    [sent] = sink.wait_for_messages(1, timeout=15)
    assert "bell" in sent["body"] and not any(ch in FORBIDDEN for ch in sent["body"])


def test_twiml_strips_every_character_xml_forbids() -> None:
    from bot.twiml import twiml

    body = twiml(["a" + FORBIDDEN + "\ud800b\t\n\r é 😀"]).body.decode("utf-8", "surrogatepass")
    [message] = ElementTree.fromstring(body.encode("utf-8")).iter("Message")
    assert message.text == "ab\t\n\n é 😀"  # an XML parser reads the carriage return as a line end


# --------------------------------------------------------------------------------- 9. a private database


def test_database_files_are_private(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = await SQLiteStore.open(str(tmp_path / "wabot.db"), 3600)
        try:
            reply = OwedReply(sid=new_sid(), to="whatsapp:+15550001111", user_key="u", prompt="p", arrived_at=0.0)
            assert await store.accept(reply)
            for name in ("wabot.db", "wabot.db-wal", "wabot.db-shm"):
                mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
                assert mode & 0o077 == 0, f"{name} is {oct(mode)}"
        finally:
            await store.close()

    old = os.umask(0o022)  # the usual umask, under which files are world-readable by default
    try:
        asyncio.run(scenario())
    finally:
        os.umask(old)


@pytest.fixture
def untrusted_tls_server() -> Iterator[str]:
    """A TLS server on 127.0.0.1 whose certificate (tests/fixtures/tls, self-signed, valid for 127.0.0.1) no CA
    signed: the URL of its /v1."""
    fixtures = Path(__file__).parent / "fixtures" / "tls"
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(fixtures / "self-signed.pem", fixtures / "self-signed.key")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10.0)
    handshakes: list[str] = []

    def serve() -> None:
        for _ in range(8):  # the client's attempts: bounded, and the test closes the listener when done
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                try:
                    server_tls.wrap_socket(connection, server_side=True).close()
                    handshakes.append("completed")
                except (ssl.SSLError, OSError) as exc:
                    handshakes.append(type(exc).__name__)

    thread = threading.Thread(target=serve, name="untrusted-tls", daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}/v1"
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept above (Linux), where close alone would not
        listener.close()
        thread.join(timeout=10.0)
    assert "completed" not in handshakes, handshakes


def test_the_model_client_refuses_a_server_whose_certificate_no_ca_signed(untrusted_tls_server: str) -> None:
    # Every client of the process shares one TLS context (bot/tls.py): sharing must not have turned checks off.
    settings = Settings(_env_file=None, openai_api_key=SecretStr("sk-test"), openai_base_url=untrusted_tls_server)

    async def ask() -> BaseException:
        client = make_client(settings)
        try:
            await client.with_options(max_retries=0).responses.create(model="m", input="hi")
        except openai.APIConnectionError as exc:
            return exc
        finally:
            await client.close()
        raise AssertionError("the call went through")

    error = asyncio.run(ask())
    causes = []
    cause: BaseException | None = error
    while cause is not None and len(causes) < 10:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    assert any(isinstance(c, ssl.SSLCertVerificationError) for c in causes), [repr(c) for c in causes]
