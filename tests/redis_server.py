"""A real `redis-server` (Debian package) on a free loopback port, for the tests that need a shared store.

It can be killed and started again on the same port and data directory, which is how the fault tests restart
Redis under a running bot.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from tests.binaries import find_binary
from tests.conftest import free_port
from tests.waiting import wait_until


class RedisServer:
    """One redis-server process. `durable=True`: append-only file fsynced on every write (`appendfsync always`),
    so a SIGKILL loses nothing Redis acknowledged, as with a production Redis configured for durability."""

    def __init__(self, workdir: Path, *, durable: bool = False, port: int | None = None) -> None:
        self.binary = find_binary("redis-server", "redis-server")
        self.workdir = workdir
        self.durable = durable
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> RedisServer:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        command += [*persistence, "--dir", str(self.workdir)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answers, timeout, f"redis-server did not start on port {self.port}")
        return self

    def answers(self) -> bool:
        """True when the server answers PING."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash would: no chance to save anything the append-only file does not already hold."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
