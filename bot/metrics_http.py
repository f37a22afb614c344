"""The HTTP server of the metrics port (/metrics, /status): one asyncio loop in a thread, a few worker threads.

The standard library's threading server started a thread per connection and waited on it without a timeout: 150
idle connections held 150 threads. Here a connection costs a socket until its request head arrives (at most
`connection_timeout_s`, then it is closed); only a complete request takes one of `workers` threads, to run the WSGI
app (prometheus-client's exposition, the status page). One request per connection (`Connection: close`), which is
what Prometheus and `wabot status` send.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

_MAX_HEAD_BYTES = 16 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}


class MetricsServer:
    """Serve `app` on (host, port) until `stop()`."""

    def __init__(
        self,
        app: WSGIApp,
        host: str,
        port: int,
        *,
        connection_timeout_s: float = 5.0,
        workers: int = 2,
        max_connections: int = 256,
    ) -> None:
        self._app = app
        self._timeout = connection_timeout_s
        self._max_connections = max_connections
        self._open = 0
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="metrics-app")
        # Same address-family choice as prometheus_client.start_http_server, so the host may be IPv6.
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(sockaddr)
        self.port: int = self._sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-server", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        server = await asyncio.start_server(self._connection, sock=self._sock, limit=_MAX_HEAD_BYTES)
        self._ready.set()
        async with server:
            await self._stopped.wait()

    def stop(self) -> None:
        """Stop accepting, close the socket and the worker threads."""
        if self._stopped is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(OSError):
            self._sock.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self._max_connections:
            writer.close()
            return
        self._open += 1
        try:
            async with asyncio.timeout(self._timeout):
                head = await reader.readuntil(b"\r\n\r\n")
            environ = _environ(head, writer.get_extra_info("sockname"))
            if environ is None:
                response = _response("400 Bad Request", [("Content-Type", "text/plain")], b"bad request\n")
            else:
                loop = asyncio.get_running_loop()
                response = await loop.run_in_executor(self._pool, _call, self._app, environ)
            writer.write(response)
            async with asyncio.timeout(self._timeout):
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass  # an idle, slow, oversized or vanished client: its connection is closed, nothing else to do
        finally:
            self._open -= 1
            writer.close()


def _environ(head: bytes, sockname: Any) -> dict[str, Any] | None:
    """The WSGI environ of a request head, or None when it is not HTTP."""
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, protocol = lines[0].split(" ")
    except ValueError:
        return None
    if not protocol.startswith("HTTP/"):
        return None
    path, _, query = target.partition("?")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote(path),
        "QUERY_STRING": query,
        "SERVER_NAME": str(sockname[0]) if sockname else "",
        "SERVER_PORT": str(sockname[1]) if sockname else "",
        "SERVER_PROTOCOL": protocol,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),  # GET and HEAD only: a body is never read
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            continue
        key = name.strip().upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            environ[key] = value.strip()
        else:
            environ[f"HTTP_{key}"] = value.strip()
    return environ


def _call(app: WSGIApp, environ: dict[str, Any]) -> bytes:
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[..., Any]:
        started[:] = [status, headers]
        return lambda _: None

    try:
        result = app(environ, start_response)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
    except Exception:
        return _response("500 Internal Server Error", [("Content-Type", "text/plain")], b"internal error\n")
    status, headers = started
    if environ["REQUEST_METHOD"] == "HEAD":
        declared = [v for k, v in headers if k.lower() == "content-length"]
        return _response(status, headers, b"", length=int(declared[0]) if declared else len(body))
    return _response(status, headers, body)


def _response(status: str, headers: list[tuple[str, str]], body: bytes, length: int | None = None) -> bytes:
    kept = [(k, v) for k, v in headers if k.lower() not in ("content-length", "connection")]
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in kept)]
    lines += [f"Content-Length: {len(body) if length is None else length}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
