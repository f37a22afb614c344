"""`python -m bot ...` subprocesses forked from a server that has already imported the heavy libraries.

A fresh `wabot serve` spends about 2.5 s of CPU importing openai, FastAPI, aiohttp and twilio before it does
anything, nine tenths of what a short test's bot process costs; the suite starts dozens. The fork server (this file,
run as a script by the first test that needs it, one per pytest worker) imports those libraries once and forks a
child per request, as gunicorn's --preload does. The child is a process of its own, in a session of its own, with
the test's argv, environment, working directory and output file, and runs `bot` as `python -m bot` does
(runpy._run_module_as_main), exits as it would (SystemExit code, traceback and 1 on an exception, atexit handlers
run). Of the project only bot.warmup is preloaded, to run the SDK's warm-up once (`_warm_up_the_sdk`): the rest of
bot, telemetry, and prometheus_client (which reads PROMETHEUS_MULTIPROC_DIR when imported) are imported in the
child, after its environment is set.

The child is forked twice so that it is reparented to the pytest worker, which is made a child subreaper
(prctl PR_SET_CHILD_SUBREAPER): the test then waits for it and reads its exit status like a subprocess's
(`Forked` has the Popen methods the tests use).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# Libraries that read nothing of the environment when imported and start no thread: safe to import before a fork.
PRELOAD = (
    "openai",
    "fastapi",
    "uvicorn",
    "aiohttp",
    "twilio.rest",
    # The REST client imports these on first use (each bot's TwilioSender): ~170 ms of a child's start.
    "twilio.rest.api",
    "twilio.rest.messaging",
    "twilio.request_validator",
    "typer",
    "structlog",
    "httpx2",
    "httpcore2",
    "anyio._backends._asyncio",  # httpcore2's async pool imports it on first use, at the latest when it closes
    "pydantic_settings",
    "aiosqlite",
    "redis.asyncio",
    "opentelemetry.sdk.trace",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "pydantic.v1",  # FastAPI imports it when the app's first routes are declared
)
_PR_SET_CHILD_SUBREAPER = 36


class Forked:
    """A process the fork server started for this one: the subset of subprocess.Popen the tests use."""

    def __init__(self, pid: int, args: list[str]) -> None:
        self.pid, self.args = pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            time.sleep(0.01)  # the poll interval of a bounded wait for an exit status
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Client:
    """This pytest worker's connection to its fork server."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
        ours, theirs = socket.socketpair()
        self._lock = threading.Lock()
        self._file = ours.makefile("rw", encoding="utf-8")
        self._socket = ours
        self.server = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()

    def spawn(
        self, args: list[str], *, cwd: Path, env: dict[str, str], output: Path, errors: Path | None = None
    ) -> Forked:
        request = {"args": args, "cwd": str(cwd), "env": env, "output": str(output), "errors": str(errors or output)}
        with self._lock:
            self._file.write(json.dumps(request) + "\n")
            self._file.flush()
            answer = self._file.readline()
        if not answer:
            raise RuntimeError(f"the fork server exited with {self.server.poll()}")
        return Forked(int(answer), args)


_client: _Client | None = None


def spawn_bot(args: list[str], *, cwd: Path, env: dict[str, str], output: Path) -> Forked:
    """`python -m bot *args` in `cwd` with exactly `env`, stdout and stderr to `output`, in a new session."""
    global _client
    if _client is None:
        _client = _Client()
    return _client.spawn([sys.executable, "-m", "bot", *args], cwd=cwd, env=env, output=output)


def run_wabot(
    args: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """`python -m bot *args` to completion, as subprocess.run(..., capture_output=True, text=True) would run it (the
    environment is this process's unless `env` is given), forked from the fork server: a CLI command's own work, not
    2.5 s of imports first. Raises subprocess.TimeoutExpired (after killing it) past `timeout`."""
    global _client
    if _client is None:
        _client = _Client()
    command = [sys.executable, "-m", "bot", *args]
    with tempfile.TemporaryDirectory(prefix="wabot-cli-") as work:
        out, err = Path(work) / "stdout", Path(work) / "stderr"
        child = _client.spawn(command, cwd=cwd, env=dict(os.environ) if env is None else env, output=out, errors=err)
        try:
            code = child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(5.0)
            raise
        return subprocess.CompletedProcess(command, code, out.read_text(), err.read_text())


# ------------------------------------------------------------------------------------------------ the server


def _child(request: dict[str, Any], *inherited: Any) -> None:
    """Runs in the forked process: becomes `python -m bot ...` and never returns to the server's loop."""
    for thing in inherited:
        thing.close()
    os.setsid()
    out = os.open(request["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = out
    if request["errors"] != request["output"]:
        err = os.open(request["errors"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in {out, err, null}:
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["-m", *request["args"][3:]]  # as the interpreter sets it for -m, before runpy fills in the path
    sys.path[0] = os.getcwd()  # `python -m` puts the working directory first, not this script's directory
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdout.reconfigure(line_buffering=unbuffered, write_through=unbuffered)
    import runpy

    runpy._run_module_as_main("bot")  # type: ignore[attr-defined]
    raise SystemExit(0)


def _warm_up_the_sdk() -> None:
    """What every bot does before it serves (bot/warmup.py): the OpenAI SDK's request building and response parsing
    run once in memory, which builds the pydantic validators of its Responses types. Done here, each forked bot's own
    warm-up finds them built, as a second bot in one process does (measured: a demo process 1.08 -> 0.85 s of CPU to
    start). bot.warmup imports only the SDK and reads nothing of the environment; the child still imports the rest
    of the project itself."""
    import asyncio

    from openai.types.responses import FunctionToolParam

    from bot.warmup import warm_up_openai

    tool: FunctionToolParam = {"type": "function", "name": "warm_up", "parameters": {"type": "object"}, "strict": False}
    asyncio.run(warm_up_openai(tools=[tool]))


def _serve(fd: int) -> None:
    for name in PRELOAD:
        __import__(name)
    _warm_up_the_sdk()
    # What a fork inherits is frozen (Python's advice for fork without exec, gc.freeze): no collection in a child
    # walks it again. Without this the child's imports and its own freeze (bot/gc_policy.py) walked the whole
    # preloaded heap, several times per child.
    from bot.gc_policy import GcPolicy

    GcPolicy.freeze()
    connection = socket.socket(fileno=fd)
    requests = connection.makefile("r", encoding="utf-8")
    while line := requests.readline():
        request = json.loads(line)
        read, write = os.pipe()
        middle = os.fork()
        if middle == 0:
            pid = os.fork()
            if pid == 0:
                os.close(read)
                os.close(write)
                # Raises SystemExit when the bot is done, and the interpreter exits as `python -m bot` would.
                _child(request, requests, connection)
            os.write(write, f"{pid}\n".encode())
            os._exit(0)  # the child is orphaned now, and so adopted by the subreaper (the pytest worker)
        os.close(write)
        os.waitpid(middle, 0)  # only then is the child the worker's: it may wait for it from now on
        with os.fdopen(read) as answer:
            connection.sendall(answer.readline().encode())


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
