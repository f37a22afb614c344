"""The heap test's OpenAI simulator (behind a gate) and Twilio sink, served from a process of their own.

tests/test_memory.py traces every allocation of its process for minutes; the doubles did about a third of that
process's work (py-spy: the sink's and the simulator's threads 27 % of the samples, the bot's 59 %), all of it
traced, none of it what the test measures. Here they run untraced, in a child started with `spawn` (a fork of a
pytest worker with threads running could inherit a lock held by one of them), driven over a pipe by `Doubles`.
Both answer every request with `Connection: close`: the bot's HTTP clients then keep no idle connection to them
(a pool of kept-alive connections, each holding its last request and response, sized by the busiest moment of the
last few seconds, would move the bot's heap by tens of KB from one snapshot to the next).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import traceback
from collections.abc import MutableMapping
from multiprocessing.connection import Connection
from typing import Any

Scope = MutableMapping[str, Any]
START_TIMEOUT_S = 60.0  # a spawned interpreter imports FastAPI and the doubles first (~2 s idle, more when loaded)


class _Gate:
    """Holds requests while closed; the simulator's event loop waits at it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._waiting: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def open(self) -> None:
        with self._lock:
            self._closed = False
            waiting, self._waiting = self._waiting, []
        for loop, waiter in waiting:
            loop.call_soon_threadsafe(_let_through, waiter)

    async def passage(self) -> None:
        with self._lock:
            if not self._closed:
                return
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            self._waiting.append((loop, waiter))
        await waiter


def _let_through(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _one_request_per_connection(app: Any, gate: _Gate | None = None) -> Any:
    """`app` answering with `Connection: close`, behind `gate` if given."""

    async def wrapped(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_closing(message: Scope) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        if gate is not None:
            await gate.passage()
        await app(scope, receive, send_closing)

    return wrapped


def _serve(conn: Connection, account_sid: str, auth_token: str) -> None:
    """The child: start both doubles, send their URLs, then carry out the parent's commands until "stop"."""
    from bot.demo.loopback import LoopbackServer
    from bot.demo.openai_simulator import OpenAISimulator
    from bot.demo.twilio_sink import TwilioSink

    sim = OpenAISimulator(mode="instant", seed=7, echo=True)
    sink = TwilioSink(account_sid=account_sid, auth_token=auth_token, status_callbacks=False)
    gate = _Gate()
    servers = [
        LoopbackServer(_one_request_per_connection(sim.app, gate), name="memory-openai"),
        LoopbackServer(_one_request_per_connection(sink.app), name="memory-sink"),
    ]
    conn.send(("ok", [server.start() for server in servers]))

    def take() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """What the doubles recorded since the last take, forgotten (they keep everything by design: the sink every
        message, the simulator every call and every response, for previous_response_id, which no new user sends)."""
        messages, calls = sink.messages(), sim.calls()
        sink.clear()
        sim.clear_calls()
        sim._responses.clear()
        return messages, calls

    commands = {
        "close": lambda _: gate.close(),
        "open": lambda _: gate.open(),
        "wait_for_messages": lambda n: sink.wait_for_messages(n, timeout=30),
        "take": lambda _: take(),
    }
    try:
        while (command := conn.recv())[0] != "stop":
            name, arg = command
            try:
                conn.send(("ok", commands[name](arg)))
            except Exception:  # the parent raises it, with the child's traceback
                conn.send(("error", traceback.format_exc()))
    finally:
        gate.open()
        sim.shutdown()
        for server in servers:
            server.stop()
        conn.send(("ok", None))


class Doubles:
    """The parent's handle on the child: its two base URLs and its commands, each answered before it returns."""

    def __init__(self, account_sid: str, auth_token: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child, account_sid, auth_token), name="memory-doubles", daemon=True
        )
        self._process.start()
        child.close()
        self.sim_url, self.sink_url = self._answer(START_TIMEOUT_S)

    def _answer(self, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"the doubles' process did not answer within {timeout:g} s")
        status, value = self._conn.recv()
        if status == "error":
            raise RuntimeError(f"in the doubles' process:\n{value}")
        return value

    def _do(self, name: str, arg: Any = None, timeout: float = 60.0) -> Any:
        self._conn.send((name, arg))
        return self._answer(timeout)

    def close_gate(self) -> None:
        """From now on every model call waits until open_gate()."""
        self._do("close")

    def open_gate(self) -> None:
        self._do("open")

    def wait_for_messages(self, n: int) -> None:
        """Until the sink has accepted `n` messages since the last take() (30 s at most)."""
        self._do("wait_for_messages", n)

    def take(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The messages the sink accepted and the calls the simulator logged since the last take."""
        messages, calls = self._do("take")
        return messages, calls

    def stop(self) -> None:
        try:
            self._do("stop", timeout=15.0)
        finally:
            self._conn.close()
            self._process.join(timeout=15.0)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=5.0)
