"""What telemetry costs per message, counted in CPU instructions rather than seconds.

Throughput and CPU seconds on a shared 2-core VM move by 10-20 % from one round to the next, as much as the cost
being measured. The number of instructions the bot executes for a message does not depend on what else runs on the
machine: each configuration runs under `valgrind --tool=callgrind` with instrumentation off while it starts and
warms up; then counting is switched on (`callgrind_control -i on`), a fixed set of messages goes through, and once
the OTLP receiver has every span of them the counter is read (`callgrind_control -e`). Every thread of the bot
counts (the OTLP exporter's included); the kernel's share (system calls, the network stack) does not.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import procs
from bench.bodies import new_run, signed_body
from bench.botproc import scrape, start_bot, start_peer
from bench.burst import burst
from bench.loadgen import ensure_debian_tool
from bench.scenarios import FAST_CONFIGS, _counter_delta, stubs

# The exporter's timer sends what it holds every 5 s; under callgrind, 50 times slower, that would be batches of
# ~140 spans, where at the fast path's real rate (~1,000 spans/s) batches are full: the run keeps them full
# (no timer, batches of `batch` spans) so that each HTTP request's cost is shared as it is at speed. Messages are
# then counted in whole batches: with 4 spans per message, `batch / 4` messages fill one.
_SPANS_PER_MESSAGE = 4
# Eight messages in flight, as a share of the fast path's 32 connections: what is amortized over concurrent
# messages there (the store's group commit, the event loop's wake-ups) is amortized here too.
CONCURRENCY = 8
_concurrency = [CONCURRENCY]  # `python -m bench.instructions --concurrency` changes it for a one-off count
_NO_TIMER_MS = "600000"
_CONTROL_TIMEOUT_S = 60
_THREAD_IR = re.compile(r"^\s*Th\s*\d+\s+([\d,]+)\s*$", re.M)


class CallgrindMissing(RuntimeError):
    """valgrind (with callgrind_control) is not installed."""


def ensure_callgrind() -> None:
    """valgrind and callgrind_control, installed if missing and allowed (Debian package 'valgrind')."""
    if not (ensure_debian_tool("callgrind_control", "valgrind") and shutil.which("valgrind")):
        raise CallgrindMissing(
            "bench: valgrind is not installed and could not be installed here. Install it (Debian/Ubuntu: "
            "`sudo apt-get install valgrind`) and run `make bench` again, or leave it out: --only without instructions."
        )


def _control(*args: str) -> str:
    done = subprocess.run(
        ["callgrind_control", *args], capture_output=True, text=True, timeout=_CONTROL_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"callgrind_control {' '.join(args)} failed: {done.stderr or done.stdout}")
    return done.stdout


def _instructions(pid: int) -> int:
    """Instructions executed since counting was switched on, summed over the threads callgrind lists (one started
    meanwhile counts from zero)."""
    out = _control("-e", "Ir", str(pid))
    found = _THREAD_IR.findall(out)
    if not found:
        raise RuntimeError(f"no instruction count in callgrind_control's answer:\n{out}")
    return sum(int(value.replace(",", "")) for value in found)


def _send(bot: procs.Proc, count: int) -> int:
    run = new_run()
    result = burst(
        f"{bot.url}/whatsapp", lambda i: signed_body(i, "hello", bot.url, run), count, concurrency=_concurrency[0]
    )
    return result.ok


def _spans_received(otlp: procs.Proc) -> int:
    return int(procs.http_json(f"{otlp.url}/_otlp/stats")["spans"])


def _wait_spans(otlp: procs.Proc, count: int, timeout: float = 120.0) -> None:
    """Until the receiver has `count` spans (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    while _spans_received(otlp) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{_spans_received(otlp)} spans exported, {count} expected, after {timeout:.0f} s")
        time.sleep(0.2)  # poll interval of a bounded loop


def count_one(
    work: Path, stubs: Any, env: dict[str, str], *, messages: int, batch: int, peer: bool = False
) -> dict[str, Any]:
    """Start the bot under callgrind with `env`, warm it up, count the instructions of `messages` messages.
    `peer`: the minimal peer bot (bench/peer_bot.py) instead of wabot (it exports no spans and has no wabot metrics)."""
    out_file = work / "callgrind.out.%p"
    wrapper = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_file}"]
    env = {**env, "OTEL_BSP_SCHEDULE_DELAY": _NO_TIMER_MS, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": str(batch)}
    # The GC probe's loop-stall timer would count instructions in proportion to the run's wall time.
    env["BENCH_LOOP_STALLS"] = "0"
    # Under callgrind a message takes ~50 times longer, more on a loaded machine: past the production deadline it
    # would take the holding-reply path, and the count would be of another path than the fast one.
    env["WABOT_REPLY_TIMEOUT"] = "14"  # the longest Settings allows
    if peer:
        bot = start_peer(
            work, simulator=stubs.simulator.url, sink=stubs.sink.url, wrapper=wrapper, up_timeout=300, env=env
        )
    else:
        bot = start_bot(
            work,
            simulator=stubs.simulator.url,
            sink=stubs.sink.url,
            otlp=stubs.otlp.url,
            env=env,
            wrapper=wrapper,
            up_timeout=300,
        )
    exports = (
        not peer
        and env.get("OTEL_SDK_DISABLED") != "true"
        and env.get("OTEL_TRACES_EXPORTER") != "none"
        and env.get("OTEL_TRACES_SAMPLER") != "always_off"
    )
    per_batch = batch // _SPANS_PER_MESSAGE
    try:
        # The warm-up runs instrumented too: callgrind translates code the first time it runs, and lazy imports
        # and caches fill on the first messages; neither belongs to the steady cost of a message. It is one
        # batch long, so its spans have left before counting starts.
        _control("-i", "on", str(bot.pid))
        spans_before = _spans_received(stubs.otlp)
        warm_ok = _send(bot, per_batch)
        if exports:
            _wait_spans(stubs.otlp, spans_before + batch)
        before_metrics = {} if peer else scrape(bot)
        spans_before = _spans_received(stubs.otlp)
        before = _instructions(bot.pid)
        started = time.monotonic()
        ok = _send(bot, messages)
        sent_s = time.monotonic() - started
        if exports:
            _wait_spans(stubs.otlp, spans_before + _SPANS_PER_MESSAGE * messages)
        after = _instructions(bot.pid)
        after_metrics = {} if peer else scrape(bot)
        spans = _spans_received(stubs.otlp) - spans_before
    finally:
        bot.stop(timeout=120)
    return {
        "messages": messages,
        "ok": ok,
        "warm_up_ok": warm_ok,
        "instructions": after - before,
        "instructions_per_message": round((after - before) / messages),
        "spans": spans,
        "batch": batch,
        "seconds_under_callgrind": round(sent_s, 1),
        "outcomes": _counter_delta(before_metrics, after_metrics, "wabot_ai_runs_total"),
    }


# Full telemetry against the two ways of switching it off (see bench/scenarios.py's FAST_CONFIGS), and in between
# full telemetry with one part of tracing taken away, which says where tracing's cost goes: its machinery alone
# (spans started and made current, none recorded), recording spans, and exporting them. Head sampling is left out:
# its batches would not fill, and its cost lies between these.
CONFIGS = {
    "full": FAST_CONFIGS["full"],
    "full, spans not exported": {"OTEL_TRACES_EXPORTER": "none"},
    "full, no span recorded": {"OTEL_TRACES_SAMPLER": "always_off"},
    "tracing off": FAST_CONFIGS["tracing off"],
    "telemetry off": FAST_CONFIGS["telemetry off"],
}


def telemetry_cost(ctx: Any) -> dict[str, Any]:
    """Instructions per fast-path message for each configuration, `rounds` times each, interleaved."""
    ensure_callgrind()
    sizes = ctx.sizes
    results: dict[str, list[dict[str, Any]]] = {key: [] for key in CONFIGS}
    with stubs(ctx, "instructions") as s:
        for r in range(sizes.instruction_rounds):
            for key in CONFIGS:
                ctx.say(f"instructions: round {r + 1}/{sizes.instruction_rounds} {key} (under callgrind)")
                work = ctx.dir(f"instructions-{r}-{key.replace(' ', '-')}")  # fresh store: no history carried over
                results[key].append(
                    count_one(work, s, CONFIGS[key], messages=sizes.instruction_messages, batch=sizes.instruction_batch)
                )
    return {"concurrency": CONCURRENCY, "runs": results}


def peers_cost(ctx: Any) -> dict[str, Any]:
    """Instructions per fast-path message: the minimal peer bot, wabot with full telemetry, wabot with telemetry off."""
    ensure_callgrind()
    sizes = ctx.sizes
    configs: dict[str, tuple[dict[str, str], bool]] = {
        "minimal bot": ({}, True),
        "wabot, full telemetry": (FAST_CONFIGS["full"], False),
        "wabot, telemetry off": (FAST_CONFIGS["telemetry off"], False),
    }
    results: dict[str, list[dict[str, Any]]] = {key: [] for key in configs}
    with stubs(ctx, "peers-instructions") as s:
        for r in range(sizes.instruction_rounds):
            for key, (env, peer) in configs.items():
                ctx.say(f"peers: round {r + 1}/{sizes.instruction_rounds} {key} (under callgrind)")
                work = ctx.dir(f"peers-{r}-{key.replace(' ', '-').replace(',', '')}")
                results[key].append(
                    count_one(
                        work, s, env, messages=sizes.instruction_messages, batch=sizes.instruction_batch, peer=peer
                    )
                )
    return {"concurrency": CONCURRENCY, "runs": results}


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.instructions CONFIG... [--rounds N] [--messages M]`: one configuration's count, alone."""
    import argparse
    import json
    import tempfile

    from bench.config import FULL
    from bench.scenarios import Context

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("configs", nargs="+", choices=[*CONFIGS, "minimal bot"])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--messages", type=int, default=FULL.instruction_messages)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="messages in flight")
    parser.add_argument(
        "--source", help="count the bot of this commit (its bot/ and telemetry/ are put where `python -m bot` runs)"
    )
    args = parser.parse_args(argv)
    _concurrency[0] = args.concurrency
    ensure_callgrind()
    ctx = Context(work=Path(tempfile.mkdtemp(prefix="wabot-instructions-")), sizes=FULL)
    with stubs(ctx, "stubs") as s:
        for r in range(args.rounds):
            for key in args.configs:
                peer = key == "minimal bot"
                work = ctx.dir(f"{r}-{key.replace(' ', '-').replace(',', '')}")
                if args.source:
                    # `python -m bot` runs in the work directory, first on sys.path: this commit's code is the bot.
                    archive = subprocess.run(
                        ["git", "archive", args.source, "bot", "telemetry"], capture_output=True, check=True
                    )
                    subprocess.run(["tar", "-x", "-C", str(work)], input=archive.stdout, check=True)
                env = {} if peer else CONFIGS[key]
                counted = count_one(work, s, env, messages=args.messages, batch=FULL.instruction_batch, peer=peer)
                print(json.dumps({"config": key, "round": r + 1, **counted}), flush=True)


if __name__ == "__main__":
    main()
