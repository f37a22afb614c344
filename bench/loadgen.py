"""The load generator: wrk (C, event-driven) driven by bench/wrk.lua, run as a child process.

wrk is installed from Debian's package when missing. Its own CPU time is read from the kernel's accounting of
the child (wait4), so every result says how much of a core the generator itself used.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import clean_env

SCRIPT = Path(__file__).with_name("wrk.lua")
THREADS = 2  # one per core of the reference machine; wrk's threads share nothing


class GeneratorMissing(RuntimeError):
    pass


def ensure_debian_tool(command: str, package: str) -> str | None:
    """The path of `command`, installing Debian's `package` first if it is missing and we are allowed to."""
    found = shutil.which(command)
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"bench: {command} not found, installing it with apt-get (Debian package '{package}')", flush=True)
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
            subprocess.run(argv, check=False, stdout=subprocess.DEVNULL, timeout=600)
        return shutil.which(command)
    return None


def ensure_wrk() -> str:
    """The path of wrk, installed if missing and allowed."""
    found = ensure_debian_tool("wrk", "wrk")
    if found:
        return found
    raise GeneratorMissing(
        "bench: the load generator wrk is not installed and could not be installed here. "
        "Install it (Debian/Ubuntu: `sudo apt-get install wrk`; macOS: `brew install wrk`) and run `make bench` again."
    )


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    errors: dict[str, int]
    wrapped: int  # times a thread ran out of unique bodies (0 in a valid run)
    latency_ms: dict[str, float]  # min, mean, p50, p90, p99, p999, max
    cpu_seconds: float  # wrk's own user + system time

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def cpu_share(self) -> float:
        """Fraction of one core wrk used while it ran."""
        return self.cpu_seconds / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "rps": round(self.rps, 1),
            "errors": self.errors,
            "wrapped": self.wrapped,
            "latency_ms": self.latency_ms,
            "cpu_seconds": round(self.cpu_seconds, 3),
        }


def run_wrk(
    url: str,
    bodies: Path,
    *,
    connections: int,
    seconds: float,
    stagger_ms: int = 0,
    timeout_s: float = 30.0,
    threads: int = THREADS,
) -> WrkResult:
    """POST the bodies to `url` from `connections` connections for `seconds`, closed loop (one request each)."""
    wrk = ensure_wrk()
    threads = max(1, min(threads, connections))
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={timeout_s:g}s",
        "-s",
        str(SCRIPT),
        url,
        "--",
        str(bodies),
        str(threads),
    ]
    env = clean_env(WRK_STAGGER_MS=str(stagger_ms), WRK_CONNECTIONS=str(connections))
    out_path = bodies.with_suffix(".wrk.out")
    with out_path.open("wb") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    rusage = _wait(popen, seconds + timeout_s + 30)
    text = out_path.read_text(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if popen.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {popen.returncode}):\n{text[-2000:]}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    latency = {k: v / 1000.0 for k, v in data["latency_us"].items()}
    return WrkResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        errors=data["errors"],
        wrapped=data["wrapped"],
        latency_ms=latency,
        cpu_seconds=rusage.ru_utime + rusage.ru_stime,
    )


def _wait(popen: subprocess.Popen[bytes], limit_s: float) -> Any:
    """Reap the child with wait4 (for its CPU time), killing it if it overruns `limit_s`."""
    deadline = time.monotonic() + limit_s
    give_up = deadline + 10.0  # after SIGKILL the kernel reaps it at once; this only bounds the loop
    while time.monotonic() < give_up:
        pid, status, rusage = os.wait4(popen.pid, os.WNOHANG)
        if pid:
            popen.returncode = os.waitstatus_to_exitcode(status)
            return rusage
        if time.monotonic() > deadline:
            popen.kill()
        time.sleep(0.05)
    raise RuntimeError(f"wrk (pid {popen.pid}) did not exit after SIGKILL")
