"""Start, stop and restart: no owed answer is lost, none is sent twice; the CLI's contracts."""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import pytest

from bot.settings import DEFAULT_HOLDING_MESSAGE
from tests.conftest import AUTH_TOKEN, CLIENT_TLS, Bot, free_port
from tests.forkserver import run_wabot
from tests.served import DemoProcess
from tests.waiting import wait_until

WABOT = [sys.executable, "-m", "bot"]


def test_restart_with_a_pending_followup_delivers_it_exactly_once(
    make_bot: Callable[..., Bot], sim, sink, tmp_path: Path
) -> None:
    store, port, user = f"sqlite:///{tmp_path}/restart.db", free_port(), "whatsapp:+15550002323"
    first = make_bot(port=port, store=store, reply_timeout=0.5)
    assert first.send("survive a restart [sim:delay=2]", sender=user[9:]).messages == [DEFAULT_HOLDING_MESSAGE]
    first.stop()  # the run is cancelled mid-flight; its reply stays journaled
    assert sink.messages(to=user) == []

    second = make_bot(port=port, store=store, reply_timeout=0.5)
    [delivered] = sink.wait_for_messages(1, to=user, timeout=15)
    assert delivered["body"] == "[turn 1] survive a restart"
    second.wait_idle()
    third = make_bot(port=free_port(), store=store)  # a further restart finds nothing owed
    third.wait_idle()
    assert len(sink.messages(to=user)) == 1
    with sqlite3.connect(f"{tmp_path}/restart.db") as db:
        assert db.execute("SELECT COUNT(*) FROM pending").fetchone() == (0,)


def test_restart_keeps_conversations_and_processed_ids(make_bot: Callable[..., Bot], sim, tmp_path: Path) -> None:
    store, port = f"sqlite:///{tmp_path}/state.db", free_port()
    first = make_bot(port=port, store=store)
    form = first.form("remember me", sender="+15550002424")
    assert first.post_form(form).messages == ["[turn 1] remember me"]
    first.stop()
    second = make_bot(port=port, store=store)
    assert second.post_form(form).messages == []  # Twilio replayed it after the restart: still a duplicate
    assert second.send("and now?", sender="+15550002424").messages == ["[turn 2] and now?"]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[..., DemoProcess]]:
    """`wabot serve --demo` subprocesses on one journal file (tmp_path/served.db), stopped at the end."""
    processes: list[DemoProcess] = []

    def start(**env: str) -> DemoProcess:
        env = {"WABOT_STORE": f"sqlite:///{tmp_path}/served.db", "WABOT_DEMO_SEED": "1", **env}
        processes.append(DemoProcess(tmp_path, env))
        return processes[-1].wait_ready(timeout=20)

    yield start
    for process in processes:
        process.stop()


def test_sigterm_finishes_in_flight_webhooks_and_keeps_owed_replies(served, tmp_path: Path) -> None:
    # 3 s of margin over the in-flight message's 1 s model: on a loaded machine 1 s of margin gave it the holding reply.
    server = served(WABOT_REPLY_TIMEOUT="4")
    # Signed posts as Twilio makes them (`wabot send`, a process of its own, is tested on its own below).
    assert server.send("a long think [sim:delay=60]", "+15550003434") == [DEFAULT_HOLDING_MESSAGE]

    in_flight: dict[str, list[str]] = {}
    sender = threading.Thread(
        target=lambda: in_flight.setdefault("r", server.send("quick one [sim:delay=1] [sim:echo]", "+15550003535"))
    )
    sender.start()
    # SIGTERM must land while the webhook is in flight: wait until the simulator has the model call.
    [started] = [e for e in server.events() if e.get("event") == "demo_started"]
    calls_url = str(started["openai"]).removesuffix("/v1") + "/_sim/calls"
    reached = lambda: any("quick one" in call["text"] for call in httpx2.get(calls_url, verify=CLIENT_TLS).json())  # noqa: E731
    wait_until(reached, 30, "the in-flight message to reach the model", 0.02)
    server.process.send_signal(signal.SIGTERM)
    sender.join(30)
    assert server.process.wait(20) == 0
    assert in_flight["r"] == ["[turn 1] quick one"]
    with sqlite3.connect(f"{tmp_path}/served.db") as db:
        rows = db.execute("SELECT prompt, answer_parts FROM pending").fetchall()
    assert rows == [("a long think [sim:delay=60]", None)]


def test_serve_without_credentials_names_every_missing_setting(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "WABOT_", "OPENAI_"))}
    result = run_wabot(["serve", "--port", str(free_port())], cwd=tmp_path, env=env)
    assert result.returncode == 2
    for name in (
        "OPENAI_API_KEY",
        "TWILIO_ACCOUNT_SID",
        "TWILIO_AUTH_TOKEN",
        "TWILIO_WHATSAPP_FROM",
        "WABOT_PUBLIC_URL",
    ):
        assert name in result.stderr
    assert "--demo" in result.stderr


def test_wabot_send_signs_like_twilio_and_prints_the_reply(bot: Bot, sim) -> None:
    env = {**os.environ, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "WABOT_PUBLIC_URL": bot.url}
    result = run_wabot(["send", "Hello from the CLI", "--url", bot.url], cwd=Path.cwd(), env=env)
    assert result.returncode == 0, result.stderr
    assert "[turn 1] Hello from the CLI" in result.stdout
    bad = run_wabot(["send", "Hello", "--url", bot.url], cwd=Path.cwd(), env={**env, "TWILIO_AUTH_TOKEN": "wrong"})
    assert bad.returncode == 1
    assert "403" in bad.stderr
    assert len(sim.calls()) == 1
