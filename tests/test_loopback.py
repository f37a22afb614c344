"""The loopback server the tests and the demo serve apps with: what it tells about the connections it holds."""

from __future__ import annotations

import httpx2
from fastapi import FastAPI

from bot.demo.loopback import LoopbackServer
from tests.conftest import CLIENT_TLS
from tests.waiting import wait_until


def test_open_connections_counts_kept_alive_clients_until_they_close() -> None:
    app = FastAPI()
    app.get("/ping")(lambda: {"ok": True})
    with LoopbackServer(app, name="counted") as server:
        assert server.open_connections() == 0
        clients = [httpx2.Client(verify=CLIENT_TLS) for _ in range(3)]
        try:
            for client in clients:
                assert client.get(f"{server.url}/ping").json() == {"ok": True}
            assert server.open_connections() == 3  # each response came back: each connection was made and is kept
        finally:
            for client in clients:
                client.close()
        wait_until(lambda: server.open_connections() == 0, 5.0, "the server to see the three closes", 0.01)
    assert server.open_connections() == 0  # stopped
