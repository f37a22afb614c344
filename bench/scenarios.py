"""The benchmark scenarios. Each starts the processes it needs, measures, stops them, and returns raw numbers.

The bot always runs as a real `wabot serve` process; the OpenAI simulator, the Twilio sink and an OTLP receiver
each run in their own process (bench/stubs.py); wrk (bench/loadgen.py) or, for fixed bursts, bench/burst.py
sends the webhooks. Nothing measured shares a process with the load generator.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import loadgen, procs, profile
from bench.bodies import new_run, signed_body, write_bodies
from bench.botproc import gc_pauses, scrape, start_bot
from bench.burst import burst
from bench.config import Sizes

# Bodies per second of run for a wrk file: above any rate the bot reaches here, so no sid is ever sent twice.
_BODIES_PER_SECOND = 1000
# A model "answer" slower than any run of the benchmark: the message stays in flight until the bot is stopped.
_NEVER_S = 590  # the simulator refuses delays over 600 s (a 3000 s one was answered with an error)


@dataclass
class Context:
    work: Path
    sizes: Sizes
    profile: bool = False
    started: float = field(default_factory=time.monotonic)
    profiles: dict[str, str] = field(default_factory=dict)  # scenario -> py-spy summary

    def dir(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def say(self, message: str) -> None:
        print(f"[bench {time.monotonic() - self.started:6.0f} s] {message}", file=sys.stderr, flush=True)


@dataclass
class Stubs:
    simulator: procs.Proc
    sink: procs.Proc
    otlp: procs.Proc


@contextmanager
def stubs(ctx: Context, name: str, *, mode: str = "instant") -> Iterator[Stubs]:
    """The simulator, the sink (no status callbacks: the bot's own work is measured) and the OTLP receiver."""
    where = ctx.dir(name)
    started: list[procs.Proc] = []
    try:
        for kind, args in (("simulator", ["--mode", mode]), ("sink", []), ("otlp", [])):
            started.append(procs.start_stub(kind, log_dir=where, args=args))
        yield Stubs(*started)
    finally:
        for proc in reversed(started):
            proc.stop()


@contextmanager
def running(proc: procs.Proc) -> Iterator[procs.Proc]:
    try:
        yield proc
    finally:
        proc.stop()


def _bot(ctx: Context, name: str, s: Stubs, *, workers: int = 1, **env: str) -> procs.Proc:
    return start_bot(
        ctx.dir(name), simulator=s.simulator.url, sink=s.sink.url, otlp=s.otlp.url, workers=workers, env=env
    )


def _counter_delta(before: dict[str, float], after: dict[str, float], prefix: str) -> dict[str, int]:
    return {
        key[len(prefix) :].strip("{}"): int(after[key] - before.get(key, 0.0))
        for key in after
        if key.startswith(prefix) and after[key] - before.get(key, 0.0)
    }


def _wrk(target: procs.Proc, bodies: Path, **kwargs: Any) -> dict[str, Any]:
    """One wrk run against `target`, with the CPU share the server processes used meanwhile."""
    pids = procs.tree(target.pid)
    cpu_before, sys_before = procs.cpu_seconds(pids)
    result = loadgen.run_wrk(f"{target.url}/whatsapp", bodies, **kwargs)
    cpu_after, sys_after = procs.cpu_seconds(pids)
    server_cpu, server_sys = cpu_after - cpu_before, sys_after - sys_before
    out = result.as_dict()
    out["server_cpu_share"] = round(server_cpu / result.seconds, 3) if result.seconds else 0.0
    # CPU per message barely moves when neighbours on the machine steal cycles; messages/s does.
    out["server_cpu_ms_per_request"] = round(1000 * server_cpu / result.requests, 3) if result.requests else None
    out["server_sys_ms_per_request"] = round(1000 * server_sys / result.requests, 3) if result.requests else None
    out["wrk_cpu_share"] = round(result.cpu_share, 3)
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def _bodies(where: Path, name: str, count: int, text: str, url: str) -> Path:
    return write_bodies(where / f"{_slug(name)}.bodies", count, text, url)


def _profiled(ctx: Context, key: str, pid: int, seconds: float) -> Any:
    if not ctx.profile:
        return None
    out = ctx.dir("profiles") / f"{_slug(key)}.txt"
    spy = profile.record(pid, seconds, out)
    if spy is None:
        ctx.say("py-spy is not installed; no profile")
    return (spy, out) if spy else None


def _profile_done(ctx: Context, key: str, handle: Any) -> None:
    if handle is None:
        return
    spy, out = handle
    spy.wait(120)
    if out.exists():
        ctx.profiles[key] = profile.summarize(out, top=25)


# ---------------------------------------------------------------- 0. the load generator alone


def generator_alone(ctx: Context) -> dict[str, Any]:
    """wrk against a server far cheaper than the bot: the rate wrk sustains and what it costs per request."""
    where = ctx.dir("generator")
    port = procs.free_port()
    server = procs.start(
        "trivial",
        [sys.executable, "-m", "bench.trivial_server", "--port", str(port)],
        log_dir=where,
        env=procs.clean_env(),
    )
    server.url = f"http://127.0.0.1:{port}"
    with running(server):
        procs.wait_until_up(server.url)
        bodies = _bodies(where, "trivial", 5000, "hello", server.url)  # repeats are fine: nothing dedupes here
        ctx.say("generator: wrk against a trivial asyncio server")
        result = _wrk(server, bodies, connections=32, seconds=ctx.sizes.generator_seconds)
    us_per_request = 1e6 * result["cpu_seconds"] / max(result["requests"], 1)
    return {"connections": 32, "threads": loadgen.THREADS, "result": result, "wrk_cpu_us_per_request": us_per_request}


# ---------------------------------------------------------------- 2 and 5. the fast path, and scaling


FAST_CONFIGS = {
    # Everything on, as shipped: every trace recorded and exported over OTLP, JSON logs, metrics.
    "full": {},
    # The operator's lever: head sampling keeps one trace in ten (logs and metrics unchanged).
    "full, 10% of traces": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
    # The other lever: every span recorded, every trace that went wrong exported, and one in ten of the rest
    # (telemetry/trace_keeping.py). On the fast path every message is answered, so one trace in ten leaves.
    "full, 10% of answered traces": {"WABOT_TRACES_KEEP_OK": "0.1"},
    "tracing off": {"OTEL_SDK_DISABLED": "true"},
    # No spans (server spans included), no per-message log lines; metrics stay (no switch: alerts depend on them).
    "telemetry off": {"OTEL_SDK_DISABLED": "true", "WABOT_LOG_LEVEL": "warning"},
}


def _fast_rounds(
    ctx: Context, name: str, targets: dict[str, procs.Proc], rounds: int, bots: set[str]
) -> dict[str, list[dict[str, Any]]]:
    """Warm every target up, then measure them in interleaved rounds (rotating the order), so that a noisy
    neighbour on the machine hurts every configuration alike rather than one of them."""
    sizes = ctx.sizes
    where = ctx.dir(name)
    per_run = math.ceil(_BODIES_PER_SECOND * (sizes.fast_seconds + 2))
    files: dict[tuple[str, int], Path] = {}
    for key, proc in targets.items():
        for r in range(-1, rounds):  # round -1 is the warm-up
            count = per_run if r >= 0 else math.ceil(_BODIES_PER_SECOND * (sizes.warmup_seconds + 2))
            files[(key, r)] = _bodies(where, f"{key}-{r + 1}", count, "hello", proc.url)
    for key, proc in targets.items():
        ctx.say(f"{name}: warm-up {key}")
        _wrk(proc, files[(key, -1)], connections=sizes.fast_connections, seconds=sizes.warmup_seconds)
    results: dict[str, list[dict[str, Any]]] = {key: [] for key in targets}
    order = list(targets)
    for r in range(rounds):
        for key in order[r % len(order) :] + order[: r % len(order)]:
            proc = targets[key]
            before = scrape(proc) if key in bots else {}
            handle = _profiled(ctx, f"{name}-{key}", proc.pid, sizes.fast_seconds - 1) if r == 0 else None
            ctx.say(f"{name}: round {r + 1}/{rounds} {key}")
            result = _wrk(proc, files[(key, r)], connections=sizes.fast_connections, seconds=sizes.fast_seconds)
            _profile_done(ctx, f"{name}-{key}", handle)
            if key in bots:
                after = scrape(proc)
                result["outcomes"] = _counter_delta(before, after, "wabot_ai_runs_total")
                result["rejections"] = _counter_delta(before, after, "wabot_webhook_rejections_total")
            results[key].append(result)
    return results


def fast_path(ctx: Context, rounds: int = 3) -> dict[str, Any]:
    """Messages/s and latency when the model answers at once: full telemetry, tracing off, telemetry off, floor."""
    with stubs(ctx, "fast") as s:
        targets: dict[str, procs.Proc] = {}
        try:
            for key, env in FAST_CONFIGS.items():
                targets[key] = _bot(ctx, _slug(f"fast-{key}"), s, **env)
            port = procs.free_port()
            bare = procs.start(
                "bare",
                [sys.executable, "-m", "bench.bare_app", "--port", str(port)],
                log_dir=ctx.dir("fast-bare"),
                env=procs.clean_env(),
            )
            bare.url = f"http://127.0.0.1:{port}"
            targets["bare"] = bare
            procs.wait_until_up(f"{bare.url}/readyz")
            results = _fast_rounds(ctx, "fast", targets, rounds, bots=set(FAST_CONFIGS))
            otlp = procs.http_json(f"{s.otlp.url}/_otlp/stats")
        finally:
            for proc in targets.values():
                proc.stop()
    return {"connections": ctx.sizes.fast_connections, "seconds": ctx.sizes.fast_seconds, "runs": results, "otlp": otlp}


def scaling(ctx: Context, rounds: int = 2) -> dict[str, Any]:
    """The fast path with full telemetry on 1, 2 and 4 worker processes (multiprocess metrics), on the default
    SQLite store and, when redis-server is installed, on Redis (a shared store built for several writers)."""
    with stubs(ctx, "scaling") as s:
        targets: dict[str, procs.Proc] = {}
        redis = procs.start_redis(ctx.dir("scaling-redis"))
        try:
            for workers in ctx.sizes.scaling_workers:
                targets[f"{workers} × sqlite"] = _bot(ctx, f"scaling-{workers}-sqlite", s, workers=workers)
            if redis is not None:
                for db, workers in enumerate(ctx.sizes.scaling_workers, start=1):
                    targets[f"{workers} × redis"] = _bot(
                        ctx, f"scaling-{workers}-redis", s, workers=workers, WABOT_STORE=f"{redis.url}/{db}"
                    )
            results = _fast_rounds(ctx, "scaling", targets, rounds, bots=set(targets))
        finally:
            for proc in targets.values():
                proc.stop()
            if redis is not None:
                redis.stop()
    return {
        "connections": ctx.sizes.fast_connections,
        "seconds": ctx.sizes.fast_seconds,
        "runs": results,
        "redis": redis is not None,
    }


# ---------------------------------------------------------------- 1. deadline precision


def _warm_up(bot: procs.Proc, messages: int = 50) -> None:
    """The first messages of a process build what later ones reuse (clients, connections, schemas)."""
    run = new_run()
    burst(f"{bot.url}/whatsapp", lambda i: signed_body(i, "hello", bot.url, run), messages, concurrency=10)


def _log_events(path: Path, event: str) -> list[dict[str, Any]]:
    found = []
    with path.open(errors="replace") as lines:
        for line in lines:
            if f'"{event}"' not in line or not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == event:
                found.append(record)
    return found


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"n": len(ordered), "p50": pick(0.50), "p99": pick(0.99), "max": ordered[-1]}


def precision(ctx: Context) -> dict[str, Any]:
    """Webhook time minus the deadline for messages that time out, at several numbers of concurrent users.

    Each user is one wrk connection that always has one message in flight: it sends the next as soon as the
    holding reply for the last one arrives, so N users send N / deadline messages a second. First messages are
    spread over one deadline, so the users' deadlines fall at independent times (no synchronized burst). Every
    message asks the simulator for an answer that takes longer than the deadline (Sizes.model_s), so every webhook
    takes the deadline path and every answer then goes out as a follow-up, as it would in production: the runs
    in flight and the follow-ups are part of the load. Full telemetry.
    """
    sizes = ctx.sizes
    deadline = sizes.deadline_s
    levels: dict[str, Any] = {}
    for users in sizes.precision_users:
        name = f"precision-{users}"
        with stubs(ctx, name) as s:
            bot = _bot(
                ctx,
                name,
                s,
                WABOT_REPLY_TIMEOUT=f"{deadline:g}",
                WABOT_FOLLOWUP_TIMEOUT="120",
                # Above every message of the run: all of them race the deadline, none gets the busy reply.
                WABOT_MAX_CONCURRENT_RUNS="1000000",
            )
            with running(bot):
                # Warm-up: the first messages of a process build what later ones reuse (clients, schemas).
                _warm_up(bot)
                expected = users * (sizes.precision_seconds + deadline) / deadline
                count = math.ceil(expected * 1.2) + users + 100
                text = f"[sim:delay={sizes.model_s:g}] hello"
                bodies = _bodies(ctx.dir(name), "messages", count, text, bot.url)
                before = scrape(bot)
                handle = _profiled(ctx, name, bot.pid, sizes.precision_seconds - 2) if users == 500 else None
                ctx.say(f"precision: {users} concurrent users, deadline {deadline:g} s")
                window = time.monotonic()
                result = _wrk(
                    bot,
                    bodies,
                    connections=users,
                    seconds=sizes.precision_seconds,
                    stagger_ms=int(deadline * 1000),
                    timeout_s=deadline + 60,
                )
                window_end = time.monotonic()
                _profile_done(ctx, name, handle)
                after = scrape(bot)
            pauses = [(gen, ms) for gen, ms, at in gc_pauses(bot) if window <= at <= window_end]
            full = [ms for gen, ms in pauses if gen == 2]
            result["gc"] = {
                "full_collections": len(full),
                "full_max_ms": max(full, default=0.0),
                "full_total_ms": round(sum(full), 1),
                "young_pauses_over_5ms": len(pauses) - len(full),
            }
            result["outcomes"] = _counter_delta(before, after, "wabot_ai_runs_total")
            result["rejections"] = _counter_delta(before, after, "wabot_webhook_rejections_total")
            server = [
                e["total_time"] - deadline for e in _log_events(bot.log_path, "total_time") if e["outcome"] == "timeout"
            ]
            result["server_overhead_s"] = _percentiles(server)
            result["overhead_ms"] = {
                k: round(result["latency_ms"][k] - 1000 * deadline, 2) for k in ("min", "p50", "p90", "p99", "max")
            }
            levels[str(users)] = result
    return {"deadline_s": deadline, "model_s": sizes.model_s, "seconds": sizes.precision_seconds, "levels": levels}


# ---------------------------------------------------------------- 3. follow-up drain


def _log_time(record: dict[str, Any], mono_offset: float) -> float:
    """A log line's wall-clock timestamp on this machine's monotonic clock (the sink's clock)."""
    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp() - mono_offset


def drain(ctx: Context) -> dict[str, Any]:
    """A backlog of finished answers going out through the Twilio REST path.

    N messages time out (deadline 1 s); each asks the simulator for an answer that is ready at one common
    instant a few seconds later, so N follow-ups are owed at once. Measured at the sink: first to last arrival.
    """
    n = ctx.sizes.drain_messages
    with stubs(ctx, "drain") as s:
        bot = _bot(
            ctx, "drain", s, WABOT_REPLY_TIMEOUT="1", WABOT_FOLLOWUP_TIMEOUT="300", WABOT_MAX_CONCURRENT_RUNS="1000000"
        )
        with running(bot):
            run = new_run()
            # Paced below what the bot takes in, so each model call reaches the simulator right after its webhook
            # was sent and the delays computed at sending all end at `ready_at`, after the last one was sent.
            rate = 200.0
            ready_at = time.time() + n / rate + 3.0

            def make(i: int) -> tuple[str, str]:
                delay = max(ready_at - time.time(), 0.0)
                return signed_body(i, f"[sim:delay={delay:.3f}] answer {i}", bot.url, run)

            before = scrape(bot)
            ctx.say(f"drain: {n} messages whose answers are ready at one instant")
            sent = burst(f"{bot.url}/whatsapp", make, n, concurrency=n, rate=rate)
            handle = _profiled(ctx, "drain", bot.pid, max(3.0, ready_at - time.time() + 5))
            arrivals: list[float] = []
            give_up = time.monotonic() + 180
            while time.monotonic() < give_up:
                arrivals = procs.http_json(f"{s.sink.url}/_bench/arrivals")["at"]
                if len(arrivals) >= n:
                    break
                time.sleep(0.5)
            _profile_done(ctx, "drain", handle)
            # The sink has a message before the bot has counted it (the journal is updated first): wait, bounded.
            give_up = time.monotonic() + 10
            after = scrape(bot)
            while time.monotonic() < give_up and after.get('wabot_followups_total{outcome="delivered"}', 0) < n:
                time.sleep(0.2)
                after = scrape(bot)
        mono_offset = time.time() - time.monotonic()
        ready = [
            _log_time(e, mono_offset)
            for e in _log_events(bot.log_path, "ai_processing_time")
            if e.get("phase") == "followup"
        ]
    arrivals.sort()
    result: dict[str, Any] = {
        "messages": n,
        "webhooks_ok": sent.ok,
        "webhooks_seconds": round(sent.seconds, 3),
        "delivered": len(arrivals),
        "outcomes": _counter_delta(before, after, "wabot_ai_runs_total"),
        "followups": _counter_delta(before, after, "wabot_followups_total"),
    }
    if len(arrivals) >= 2:
        span = arrivals[-1] - arrivals[0]
        result["first_to_last_s"] = round(span, 3)
        result["messages_per_s"] = round((len(arrivals) - 1) / span, 1) if span > 0 else None
    if ready and arrivals:
        result["answers_ready_spread_s"] = round(max(ready) - min(ready), 3)
        result["last_ready_to_last_delivered_s"] = round(arrivals[-1] - max(ready), 3)
        result["first_ready_to_first_delivered_s"] = round(arrivals[0] - min(ready), 3)
    return result


# ---------------------------------------------------------------- 4. memory


def memory(ctx: Context) -> dict[str, Any]:
    """Resident memory of the bot with N conversations in flight (model answer far away), minus its baseline."""
    with stubs(ctx, "memory") as s:
        bot = _bot(
            ctx,
            "memory",
            s,
            WABOT_REPLY_TIMEOUT="1",
            WABOT_FOLLOWUP_TIMEOUT="3600",
            WABOT_MAX_CONCURRENT_RUNS="1000000",
        )
        with running(bot):
            run = new_run()
            warm_up(bot, run)
            baseline = procs.memory_kib(bot.pid)
            levels = []
            for level, in_flight in waiting_runs(
                ctx, bot, run, ctx.sizes.memory_conversations, label="memory", timeout=30
            ):
                time.sleep(1.0)
                mem = procs.memory_kib(bot.pid)
                levels.append(
                    {
                        "conversations": level,
                        "in_flight": in_flight,
                        "rss_kib": mem["VmRSS"],
                        "hwm_kib": mem["VmHWM"],
                        "rss_per_1000_kib": round((mem["VmRSS"] - baseline["VmRSS"]) * 1000 / level),
                        "hwm_per_1000_kib": round((mem["VmHWM"] - baseline["VmRSS"]) * 1000 / level),
                    }
                )
    return {"baseline_rss_kib": baseline["VmRSS"], "baseline_hwm_kib": baseline["VmHWM"], "levels": levels}


def warm_up(bot: procs.Proc, run: str) -> None:
    """Every path a conversation takes (inline answer, holding reply, follow-up), then idle again: a baseline taken
    next includes what a first message loads, not just an idle process. Message numbers 0-249 of `run`."""
    url = f"{bot.url}/whatsapp"
    burst(url, lambda i: signed_body(i, "hello", bot.url, run), 200, concurrency=20)
    burst(url, lambda i: signed_body(200 + i, "[sim:delay=1.5] hi", bot.url, run), 50, concurrency=50)
    _wait_idle(bot, 30)
    time.sleep(1.0)  # the follow-ups' last log lines and timers settle before a baseline


def waiting_runs(
    ctx: Context, bot: procs.Proc, run: str, levels: list[int], *, label: str, timeout: float, concurrency: int = 500
) -> Iterator[tuple[int, int]]:
    """Runs whose model answer never comes in time (`[sim:delay=590]`), added until each of `levels` (ascending) is
    reached: yields the level and the runs in flight then (fewer if `timeout` passed first). From message 1000 on."""
    sent = 0
    for level in levels:
        ctx.say(f"{label}: {level} runs in flight")
        first = 1000 + sent
        burst(
            f"{bot.url}/whatsapp",
            lambda i, first=first: signed_body(first + i, f"[sim:delay={_NEVER_S}] hello", bot.url, run),
            level - sent,
            concurrency=concurrency,
        )
        sent = level
        yield level, _wait_in_flight(bot, level, timeout)


def _in_flight(bot: procs.Proc) -> int:
    return int(procs.http_json(f"{bot.url}/readyz").get("runs_in_flight", 0))


def _wait_idle(bot: procs.Proc, timeout: float) -> None:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up and _in_flight(bot):
        time.sleep(0.2)


def _wait_in_flight(bot: procs.Proc, count: int, timeout: float) -> int:
    give_up = time.monotonic() + timeout
    seen = _in_flight(bot)
    while time.monotonic() < give_up and seen < count:
        time.sleep(0.2)
        seen = _in_flight(bot)
    return seen


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate (its latencies belong to it; medians of percentiles would not)."""
    ordered = sorted(runs, key=lambda run: run["rps"])
    return ordered[len(ordered) // 2]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
