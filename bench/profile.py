"""Profiling helpers: py-spy on a running bot, and a summary of its collapsed stacks.

`record(pid, seconds, out)` samples only threads holding the GIL (`--gil`): on a busy bot that is where its one
core goes. `summarize(path)` prints the functions with the largest self and inclusive share of the samples.
Used by `python -m bench.run --profile` and by hand: `python -m bench.profile STACKS.txt`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from bench.procs import VENV_BIN


def py_spy() -> str | None:
    found = VENV_BIN / "py-spy"
    return str(found) if found.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, out: Path, *, rate: int = 100) -> subprocess.Popen[bytes] | None:
    """Start sampling `pid` for `seconds` into `out` (collapsed stacks); None when py-spy is not installed."""
    exe = py_spy()
    if exe is None:
        return None
    argv = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--gil",
        "--full-filenames",
        "--subprocesses",
        "--output",
        str(out),
    ]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# Where a sample's time is charged: the deepest frame from one of these (first match wins); stdlib frames
# (asyncio, json, typing, ...) are charged to whichever of these called them.
_PACKAGES = (
    ("opentelemetry", "/opentelemetry/"),
    ("openai SDK", "/openai/"),
    ("httpx2/httpcore2 (OpenAI client)", "/httpx2/"),
    ("httpx2/httpcore2 (OpenAI client)", "/httpcore2/"),
    ("twilio SDK (signatures, REST)", "/twilio/"),
    ("aiohttp (OpenAI + Twilio clients)", "/aiohttp"),
    ("uvloop/httptools", "/uvloop/"),
    ("uvloop/httptools", "/httptools/"),
    ("pydantic", "/pydantic"),
    ("structlog (logs)", "/structlog/"),
    ("prometheus_client (metrics)", "/prometheus_client/"),
    ("aiosqlite/sqlite3 (store)", "/aiosqlite/"),
    ("aiosqlite/sqlite3 (store)", "/sqlite3/"),
    ("uvicorn + h11 (HTTP server)", "/uvicorn/"),
    ("uvicorn + h11 (HTTP server)", "/h11/"),
    ("starlette/fastapi", "/starlette/"),
    ("starlette/fastapi", "/fastapi/"),
    ("starlette/fastapi", "/multipart/"),
    ("bot code (bot/, telemetry/)", "/bot/"),
    ("bot code (bot/, telemetry/)", "/telemetry/"),
    ("anyio", "/anyio/"),
)


def _package(frame: str) -> str | None:
    for name, marker in _PACKAGES:
        if marker in frame:
            return name
    return None


def _samples(path: Path) -> Iterator[tuple[str, int]]:
    """(stack, sample count) of each line of a py-spy raw file: "frame;frame;...;leaf count"."""
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            yield stack, int(count_text)


def by_package(path: Path) -> list[tuple[str, float]]:
    """Share of all samples charged to each package (see _PACKAGES), largest first."""
    counts: Counter[str] = Counter()
    total = 0
    for stack, count in _samples(path):
        total += count
        frames = stack.split(";")
        # Frames up to the event loop's callback runner belong to whoever started the loop, not to the work.
        runner = max((i for i, f in enumerate(frames) if f.startswith(("Handle._run ", "_run_once "))), default=-1)
        owner = "asyncio event loop, stdlib" if runner >= 0 else "other threads, stdlib"
        for frame in reversed(frames[runner + 1 :]):
            found = _package(frame)
            if found:
                owner = found
                break
        counts[owner] += count
    return [(name, n / total) for name, n in counts.most_common()] if total else []


def _frames(stack: str) -> list[str]:
    # py-spy raw lines: "thread;frame (file:line);frame ...;leaf count"; drop the line number to merge calls.
    frames = []
    for frame in stack.split(";"):
        name, _, where = frame.partition(" (")
        path = where.rsplit(":", 1)[0]
        short = "/".join(path.split("/")[-2:])
        frames.append(f"{name} ({short})")
    return frames


def summarize(path: Path, top: int = 30) -> str:
    """The `top` functions by self and by inclusive share of all samples, as text."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    for stack, count in _samples(path):
        frames = _frames(stack)
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            incl_counts[frame] += count
    if not total:
        return "(no samples)"
    lines = [f"{total} samples", "", "share  package"]
    lines += [f"{100 * share:5.1f}  {name}" for name, share in by_package(path)]
    lines += ["", "self %  function"]
    lines += [f"{100 * n / total:6.1f}  {name}" for name, n in self_counts.most_common(top)]
    lines += ["", "incl %  function"]
    lines += [f"{100 * n / total:6.1f}  {name}" for name, n in incl_counts.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("stacks", type=Path)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    sys.stdout.write(summarize(args.stacks, args.top) + "\n")


if __name__ == "__main__":
    main()
