"""Several replicas on one Redis, and crashes: every message answered once, in order, nothing lost.

A real `redis-server` (Debian package) is started on a free port. Replicas are real bot processes
(`python -m bot serve`) pointed at this test's OpenAI simulator and Twilio sink, so one can be SIGKILLed.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode

import httpx2
import pytest
from twilio.request_validator import RequestValidator

from bot.settings import DEFAULT_HOLDING_MESSAGE
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, BOT_NUMBER, Bot, Posted, free_port, new_sid


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed: run `make test` (it installs Debian's redis-server) or apt-get it"
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def ready() -> bool:
        try:
            with __import__("socket").create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    _wait_until(ready, 10, "redis-server did not start")
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(10)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushall()
    client.close()
    return redis_server


def test_same_message_to_two_replicas_is_answered_once(make_bot: Callable[..., Bot], redis_url: str, sim, sink) -> None:
    a, b = make_bot(store=redis_url), make_bot(store=redis_url)
    form = a.form("hello twice", sender="+15550101010")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda bot: bot.post_form(form, signature=bot.sign("/whatsapp", form)), [a, b]))
    assert sorted(len(p.messages) for p in answers) == [0, 1]
    assert [m for p in answers for m in p.messages] == ["[turn 1] hello twice"]
    assert len(sim.calls()) == 1


def test_one_users_messages_over_two_replicas_stay_in_order(
    make_bot: Callable[..., Bot], redis_url: str, sim, sink
) -> None:
    a, b = make_bot(store=redis_url, reply_timeout=0.5), make_bot(store=redis_url, reply_timeout=0.5)
    user = "+15550202020"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = pool.submit(a.send, "one [sim:delay=1.2]", sender=user)
        _wait_until(lambda: len(sim.calls()) == 1, 5, "first message never reached the model")
        second = pool.submit(b.send, "two", sender=user)
        other = pool.submit(b.send, "someone else", sender="+15550303030")
        assert other.result().messages == ["[turn 1] someone else"]
        assert first.result().messages == [DEFAULT_HOLDING_MESSAGE]
        assert second.result().messages == [DEFAULT_HOLDING_MESSAGE]
    answers = sink.wait_for_messages(2, to=f"whatsapp:{user}", timeout=10)
    assert [m["body"] for m in answers] == ["[turn 1] one", "[turn 2] two"]


def test_conversation_state_is_shared_between_replicas(make_bot: Callable[..., Bot], redis_url: str, sim) -> None:
    a, b = make_bot(store=redis_url), make_bot(store=redis_url)
    assert a.send("My name is Grace", sender="+15550404040").messages == ["[turn 1] My name is Grace"]
    assert b.send("first message?", sender="+15550404040").messages == ["Your first message was: My name is Grace"]


class Replica:
    def __init__(self, process: subprocess.Popen[bytes], url: str) -> None:
        self.process, self.url = process, url

    def send(self, body: str, sender: str) -> Posted:
        sid = new_sid()
        form = {"MessageSid": sid, "AccountSid": ACCOUNT_SID, "From": f"whatsapp:{sender}", "To": BOT_NUMBER}
        form["Body"] = body
        signature = RequestValidator(AUTH_TOKEN).compute_signature(f"{self.url}/whatsapp", form)
        started = time.monotonic()
        response = httpx2.post(
            f"{self.url}/whatsapp",
            content=urlencode(form),
            headers={"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature},
            timeout=30,
        )
        return Posted(response.status_code, response.text, dict(response.headers), time.monotonic() - started)

    def runs_in_flight(self) -> int:
        return httpx2.get(f"{self.url}/readyz", timeout=5).json()["runs_in_flight"]


@pytest.fixture
def replica(simulator, sink_server, tmp_path: Path) -> Iterator[Callable[..., Replica]]:
    processes: list[subprocess.Popen[bytes]] = []

    def start(store: str, **env: str) -> Replica:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("WABOT_", "TWILIO_", "OPENAI_"))},
            "OPENAI_API_KEY": "test-key",
            "OPENAI_BASE_URL": f"{simulator[1]}/v1",
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_WHATSAPP_FROM": BOT_NUMBER,
            "WABOT_TWILIO_API_URL": sink_server[1],
            "WABOT_PUBLIC_URL": url,
            "WABOT_STORE": store,
            "WABOT_REPLY_TIMEOUT": "0.5",
            "OTEL_TRACES_EXPORTER": "none",
            **env,
        }
        log = (tmp_path / f"replica-{port}.log").open("wb")
        command = [sys.executable, "-m", "bot", "serve", "--host", "127.0.0.1", "--port", str(port)]
        process = subprocess.Popen(
            [*command, "--metrics-port", str(free_port())],
            env=full_env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        processes.append(process)

        def ready() -> bool:
            assert process.poll() is None, (tmp_path / f"replica-{port}.log").read_text()
            try:
                return httpx2.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx2.HTTPError:
                return False

        _wait_until(ready, 20, "replica did not become ready")
        return Replica(process, url)

    yield start
    for process in processes:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def test_sigkilled_replicas_pending_followups_are_delivered_once_by_another(
    replica: Callable[..., Replica], redis_url: str, sim, sink
) -> None:
    doomed = replica(redis_url, WABOT_REDIS_LEASE="1")
    survivor = replica(redis_url, WABOT_REDIS_LEASE="1")
    users = [f"+1555050{i:04d}" for i in range(5)]
    with concurrent.futures.ThreadPoolExecutor(len(users)) as pool:
        posted = list(pool.map(lambda u: doomed.send(f"slow for {u} [sim:delay=3]", u), users))
    assert all(p.messages == [DEFAULT_HOLDING_MESSAGE] for p in posted)
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait(5)
    assert sink.messages() == []  # killed before any answer was ready

    delivered = sink.wait_for_messages(len(users), timeout=30)
    _wait_until(lambda: survivor.runs_in_flight() == 0, 30, "survivor still busy")
    assert sorted(m["to"] for m in delivered) == sorted(f"whatsapp:{u}" for u in users)
    assert len(sink.messages()) == len(users)  # exactly once each
    assert {m["body"] for m in sink.messages()} == {f"[turn 1] slow for {u}" for u in users}


def test_sqlite_crash_and_restart_delivers_every_pending_answer_once(
    replica: Callable[..., Replica], tmp_path: Path, sim, sink
) -> None:
    store = f"sqlite:///{tmp_path}/crash.db"
    first = replica(store)
    users = [f"+1555060{i:04d}" for i in range(3)]
    with concurrent.futures.ThreadPoolExecutor(len(users)) as pool:
        posted = list(pool.map(lambda u: first.send(f"crash test {u} [sim:delay=3]", u), users))
    assert all(p.messages == [DEFAULT_HOLDING_MESSAGE] for p in posted)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(5)
    assert sink.messages() == []

    second = replica(store)
    sink.wait_for_messages(len(users), timeout=30)
    _wait_until(lambda: second.runs_in_flight() == 0, 30, "restarted bot still busy")
    assert sorted(m["to"] for m in sink.messages()) == sorted(f"whatsapp:{u}" for u in users)
