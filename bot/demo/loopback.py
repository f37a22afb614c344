"""Serve an ASGI app with uvicorn on 127.0.0.1 from a daemon thread with its own event loop.

Used to put the OpenAI simulator, the Twilio sink and the bot itself on real sockets, so tests and benchmarks
exercise real HTTP clients. It works from sync code (pytest fixtures) and from inside a running asyncio loop,
because the server never shares the caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from types import TracebackType
from typing import Any, Literal

import uvicorn

__all__ = ["LoopbackServer"]


class _SignallingServer(uvicorn.Server):
    """A uvicorn server that reports the end of its startup through a threading.Event and stops as soon as asked.

    uvicorn notices `should_exit` on its next 0.1 s tick, then pauses 0.1 s more for the connections it asked to
    close; a test suite stops hundreds of these servers, most with no connection left. Here `wake()` ends the tick
    at once, and a shutdown with no connection and no task skips the pause (with any, uvicorn's own runs).
    """

    def __init__(self, config: uvicorn.Config, started: threading.Event) -> None:
        super().__init__(config)
        self._started_event = started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick: asyncio.Future[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await super().startup(sockets=sockets)
        finally:
            # Set even when startup fails so start() wakes up at once and reports the failure.
            self._started_event.set()

    def wake(self) -> None:
        """From any thread: end the current tick now, so that `should_exit` is seen at once."""
        loop, tick = self._loop, self._tick
        if loop is not None and tick is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed: nothing left to wake
                loop.call_soon_threadsafe(_settle, tick)

    async def main_loop(self) -> None:
        # uvicorn's loop (a tick every 0.1 s: the Date header, --limit-max-requests) with a tick that `wake` can
        # end early; made of a future and a timer, as asyncio.sleep is (asyncio.wait_for cost twice the CPU).
        assert self._loop is not None
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            self._tick = tick = self._loop.create_future()
            timer = self._loop.call_later(0.1, _settle, tick)
            try:
                await tick
            finally:
                timer.cancel()
            should_exit = await self.on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.server_state.connections or self.server_state.tasks or self.force_exit:
            await super().shutdown(sockets=sockets)
            return
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for server in self.servers:
            await server.wait_closed()
        await self.lifespan.shutdown()


def _settle(tick: asyncio.Future[None]) -> None:
    if not tick.done():
        tick.set_result(None)


def _lifespan_mode(app: Any) -> Literal["auto", "on"]:
    # Starlette (and FastAPI) apps always speak the lifespan protocol; "on" makes a failing startup hook fatal
    # instead of silently ignored. A bare ASGI callable may not, so let uvicorn probe it.
    try:
        from starlette.applications import Starlette
    except ImportError:  # pragma: no cover - starlette ships with fastapi
        return "auto"
    return "on" if isinstance(app, Starlette) else "auto"


class LoopbackServer:
    """Run `app` on 127.0.0.1 in a background thread; `start()` returns its base URL."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, name: str = "") -> None:
        self._app = app
        self._host = host
        self._port = port
        self._name = name or getattr(app, "title", "") or type(app).__name__
        self._server: _SignallingServer | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321``; only valid after start()."""
        if self._url is None:
            raise RuntimeError(f"loopback server {self._name!r} is not started")
        return self._url

    @property
    def name(self) -> str:
        return self._name

    @property
    def app(self) -> Any:
        """The application served (tests read its state, as /status does)."""
        return self._app

    def open_connections(self) -> int:
        """How many client connections the server holds right now (it lets go of one when its loop reads the close)."""
        server = self._server
        return len(server.server_state.connections) if server is not None else 0

    def start(self, timeout: float = 10.0) -> str:
        """Bind, start serving and return the base URL once uvicorn has finished its startup."""
        if self._thread is not None:
            raise RuntimeError(f"loopback server {self._name!r} already started")
        # Bind the socket ourselves so the real port is known before the thread starts, even for port=0.
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY on accepted connections only for sockets that say so,
        # and without it every kept-alive request waited ~40 ms on Nagle and delayed ACKs.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError:
            sock.close()
            raise
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            host=self._host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan=_lifespan_mode(self._app),
            timeout_graceful_shutdown=1,
        )
        self._server = _SignallingServer(config, self._started)
        self._thread = threading.Thread(target=self._run, args=(sock,), name=f"loopback-{self._name}", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            self.stop(timeout=2.0)
            raise TimeoutError(f"loopback server {self._name!r} did not start within {timeout}s")
        if self._error is not None or not self._server.started:
            self.stop(timeout=2.0)
            raise RuntimeError(f"loopback server {self._name!r} failed to start") from self._error
        self._url = f"http://{self._host}:{port}"
        return self._url

    def _run(self, sock: socket.socket) -> None:
        assert self._server is not None
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._server.serve(sockets=[sock]))
        except BaseException as exc:  # SystemExit on lifespan failure must not escape the thread silently
            self._error = exc
        finally:
            self._started.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            sock.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit (in-flight requests get 1 s of grace) and join the thread."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        server.wake()
        thread.join(timeout)
        if thread.is_alive():
            # Graceful exit is stuck (e.g. a handler ignoring cancellation): force it, then give up waiting.
            server.force_exit = True
            thread.join(min(timeout, 2.0))
        self._server = None
        self._thread = None
        self._url = None
        self._started = threading.Event()
        self._error = None

    def __enter__(self) -> LoopbackServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LoopbackServer(name={self._name!r}, url={self._url!r})"
