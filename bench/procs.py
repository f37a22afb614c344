"""Processes of a benchmark run: starting and stopping them, and what /proc says about them (CPU, memory).

Every wait here is bounded: a server that does not come up, or does not go down, fails the run instead of
hanging it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Settings of the caller's shell must not leak into a measured bot: it gets exactly the environment we build.
_FOREIGN_PREFIXES = ("WABOT_", "OTEL_", "OPENAI_", "TWILIO_", "PROMETHEUS_")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_PREFIXES)}
    env.update(extra)
    return env


def http_json(url: str, *, method: str = "GET", timeout: float = 10.0) -> Any:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


def wait_until_up(url: str, timeout: float = 30.0) -> None:
    """Poll `url` until it answers 200, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2.0) as response:
                if response.status == 200:
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not come up within {timeout:.0f} s: {last!r}")


@dataclass
class Proc:
    """A child process and the file its output goes to."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait up to `timeout` s, then SIGKILL; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


def start(name: str, argv: list[str], *, log_dir: Path, env: dict[str, str], cwd: Path | None = None) -> Proc:
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log:
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd or REPO)
    return Proc(name, popen, log_path)


def start_stub(kind: str, *, log_dir: Path, args: list[str] | None = None, timeout: float = 90.0) -> Proc:
    """Start `python -m bench.stubs KIND`; it prints its URL first thing."""
    log_path = log_dir / f"{kind}.log"
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "bench.stubs", kind, *(args or [])],
            stdout=subprocess.PIPE,
            stderr=log,
            env=clean_env(),
            cwd=REPO,
        )
    proc = Proc(kind, popen, log_path)
    assert popen.stdout is not None
    url = _read_line(popen.stdout, timeout).strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.stop()
        raise RuntimeError(f"stub {kind} did not start: {url!r} (see {log_path})")
    proc.url = url
    return proc


def _read_line(stream: IO[bytes], timeout: float) -> str:
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            return ""
    return stream.readline().decode()


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (uvicorn's worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo and len(found) < 1000:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """CPU time the processes have used so far: user + system, and system alone (the kernel's share: system calls and
    thread switches, which instruction counts under callgrind do not see)."""
    total = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        system += int(fields[12])
    return total / _CLOCK_TICKS, system / _CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of one process, in KiB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def start_redis(where: Path, timeout: float = 20.0) -> Proc | None:
    """A throwaway redis-server on a free loopback port (no persistence), or None when it is not installed."""
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(where)]
    proc = start("redis", argv, log_dir=where, env=clean_env())
    proc.url = f"redis://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            pass
        time.sleep(0.1)
    proc.stop()
    raise TimeoutError(f"redis-server did not answer within {timeout:.0f} s (see {proc.log_path})")
