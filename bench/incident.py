"""The model slow for everyone (an OpenAI incident): what the garbage collector and the event loop do with thousands
of runs waiting on the model.

- `gc_levels`: 1,000, 2,000, 5,000 runs in flight (holding reply sent, model answer far away); at each level the GC
  probe (bench/gcprobe) counts the tracked objects by type and times one forced full collection: what a full pass
  costs with that many runs waiting, in wall and in the collector's own CPU time.
- `incident`: webhooks at a fixed rate (100/s) for 60 s, each answered by the model after 60 s, so ~5,000-6,000 runs
  are in flight by the end; the production deadline (8 s). Overhead = webhook time - deadline (client and bot), the
  longest GC pause and the longest loop stall meanwhile.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

from bench import procs
from bench.bodies import new_run, signed_body
from bench.burst import burst
from bench.scenarios import (
    Context,
    _bot,
    _counter_delta,
    _log_events,
    _percentiles,
    _wait_idle,
    running,
    scrape,
    stubs,
    waiting_runs,
    warm_up,
)


def _lines(path: Path, prefix: str) -> list[dict[str, float]]:
    found = []
    with path.open(errors="replace") as lines:
        for line in lines:
            if line.startswith(prefix):
                found.append({k: float(v) for k, v in (part.split("=", 1) for part in line.split()[1:])})
    return found


def _census(bot: procs.Proc, timeout: float = 60.0) -> dict[str, Any]:
    """SIGUSR2 to the bot: its object census, and the forced full collection that follows it."""
    seen = bot.log_path.read_text(errors="replace").count("BENCH_GC_OBJECTS ")
    os.kill(bot.pid, signal.SIGUSR2)
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        text = bot.log_path.read_text(errors="replace")
        records = [line for line in text.splitlines() if line.startswith("BENCH_GC_OBJECTS ")]
        if len(records) > seen:
            census = json.loads(records[seen].removeprefix("BENCH_GC_OBJECTS "))
            full = [p for p in _lines(bot.log_path, "BENCH_GC_PAUSE ") if p["gen"] == 2 and p["at"] >= census["at"]]
            if full:
                census["forced_full_ms"] = full[0]["ms"]
                census["forced_full_cpu_ms"] = full[0]["cpu_ms"]
                return census
        time.sleep(0.2)
    raise TimeoutError("the GC probe did not answer SIGUSR2 (is bench/gcprobe on the bot's path?)")


def gc_levels(ctx: Context) -> dict[str, Any]:
    """Tracked objects and the cost of a full collection at each number of runs in flight."""
    with stubs(ctx, "gc-levels") as s:
        bot = _bot(
            ctx,
            "gc-levels",
            s,
            WABOT_REPLY_TIMEOUT="1",
            WABOT_FOLLOWUP_TIMEOUT="3600",
            WABOT_MAX_CONCURRENT_RUNS="1000000",
        )
        with running(bot):
            run = new_run()
            warm_up(bot, run)
            baseline = _census(bot)
            levels = []
            for _, in_flight in waiting_runs(ctx, bot, run, ctx.sizes.gc_levels, label="gc levels", timeout=60):
                time.sleep(1.0)
                census = _census(bot)
                census["in_flight"] = in_flight
                census["per_run"] = round((census["tracked"] - baseline["tracked"]) / max(in_flight, 1), 1)
                census["per_run_by_type"] = {
                    name: round((count - baseline["top"].get(name, 0)) / max(in_flight, 1), 2)
                    for name, count in census["top"].items()
                    if (count - baseline["top"].get(name, 0)) / max(in_flight, 1) >= 0.5
                }
                levels.append(census)
            window = [p for p in _lines(bot.log_path, "BENCH_GC_PAUSE ") if p["at"] > baseline["at"]]
    return {
        "baseline": baseline,
        "levels": levels,
        "automatic_full": sum(1 for p in window if p["gen"] == 2) - len(levels) - 1,
    }


def incident(ctx: Context) -> dict[str, Any]:
    """`rate` webhooks a second for `seconds`, every answer `model_s` late: the runs in flight pile up."""
    sizes = ctx.sizes
    rate, seconds, model_s, deadline = sizes.incident_rate, sizes.incident_seconds, sizes.incident_model_s, 8.0
    count = math.ceil(rate * seconds)
    with stubs(ctx, "incident") as s:
        bot = _bot(
            ctx,
            "incident",
            s,
            WABOT_REPLY_TIMEOUT=f"{deadline:g}",
            WABOT_FOLLOWUP_TIMEOUT=f"{model_s + 60:g}",
            WABOT_MAX_CONCURRENT_RUNS="1000000",
        )
        with running(bot):
            run = new_run()
            url = f"{bot.url}/whatsapp"
            burst(url, lambda i: signed_body(i, "hello", bot.url, run), 50, concurrency=10)
            _wait_idle(bot, 30)
            before = scrape(bot)
            ctx.say(f"incident: {rate:g} msg/s for {seconds:g} s, model {model_s:g} s, deadline {deadline:g} s")
            window = time.monotonic()
            sent = burst(
                url,
                lambda i: signed_body(1000 + i, f"[sim:delay={model_s:g}] hello", bot.url, run),
                count,
                concurrency=math.ceil(rate * (deadline + 4)),
                rate=rate,
            )
            window_end = time.monotonic()
            in_flight = int(procs.http_json(f"{bot.url}/readyz").get("runs_in_flight", 0))
            after = scrape(bot)
        pauses = [p for p in _lines(bot.log_path, "BENCH_GC_PAUSE ") if window <= p["at"] <= window_end]
        stalls = [p["ms"] for p in _lines(bot.log_path, "BENCH_LOOP_STALL ") if window <= p["at"] <= window_end]
        full = [p for p in pauses if p["gen"] == 2]
        server = [
            e["total_time"] - deadline for e in _log_events(bot.log_path, "total_time") if e["outcome"] == "timeout"
        ]
    client = [1000 * (latency - deadline) for latency in sent.latencies]
    return {
        "rate": rate,
        "seconds": seconds,
        "model_s": model_s,
        "deadline_s": deadline,
        "sent": sent.sent,
        "ok": sent.ok,
        "send_seconds": round(sent.seconds, 1),
        "in_flight_at_end": in_flight,
        "client_overhead_ms": {k: round(v, 1) for k, v in _percentiles(client).items()},
        "bot_overhead_ms": {k: round(1000 * v, 1) if k != "n" else v for k, v in _percentiles(server).items()},
        "gc": {
            "full_collections": len(full),
            "full_max_ms": max((p["ms"] for p in full), default=0.0),
            "full_max_cpu_ms": max((p["cpu_ms"] for p in full), default=0.0),
            "max_pause_ms": max((p["ms"] for p in pauses), default=0.0),
            "max_pause_cpu_ms": max((p["cpu_ms"] for p in pauses), default=0.0),
            "pauses_over_5ms": len(pauses),
        },
        "loop_stall_max_ms": max(stalls, default=0.0),
        "loop_stalls_over_50ms": sum(1 for ms in stalls if ms >= 50),
        "outcomes": _counter_delta(before, after, "wabot_ai_runs_total"),
    }
