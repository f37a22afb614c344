"""`python -m bench.waiting_objects`: the objects the garbage collector tracks per run waiting on the model.

A real `wabot serve` (full telemetry, as shipped) with the stubs of bench/stubs.py; every path is taken once
(inline answer, holding reply, follow-up), then N runs are put in flight whose model answer is far away (the
simulator's `[sim:delay=590]`), past a 1 s deadline: the state a run is in for most of an incident. The GC probe
(bench/gcprobe, SIGUSR2) counts the tracked objects by type at 0 and at each N; the difference divided by N is what
one waiting run holds. `--detail` also names them (coroutines by function, cells by content, spans by name, and the
owners of a sample), which costs minutes of the bot's CPU at 1,000 in flight. `--heap` traces the bot's every
allocation (tracemalloc) and gives the bytes one waiting run holds by file and by line, next to its share of the
resident memory (RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bodies import new_run
from bench.botproc import start_bot
from bench.config import QUICK
from bench.procs import memory_kib
from bench.scenarios import Context, running, stubs, waiting_runs, warm_up


def _records(path: Path, prefix: str) -> list[dict[str, Any]]:
    text = path.read_text(errors="replace")
    return [json.loads(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix)]


def _census(log: Path, pid: int, detail: bool, heap: bool = False, timeout: float = 600.0) -> dict[str, Any]:
    """SIGUSR2 to the bot; its census (and with `detail` the named objects, with `heap` the bytes by line) once
    written."""
    seen = len(_records(log, "BENCH_GC_OBJECTS "))
    os.kill(pid, signal.SIGUSR2)
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        records = _records(log, "BENCH_GC_OBJECTS ")
        if len(records) > seen:
            census = records[seen]
            if detail:
                census["detail"] = _records(log, "BENCH_GC_DETAIL ")[seen]
            if heap:
                census["heap"] = _records(log, "BENCH_HEAP ")[seen]
            return census
        time.sleep(0.5)
    raise TimeoutError("the GC probe did not answer SIGUSR2 (is bench/gcprobe on the bot's path?)")


def _per_run(now: dict[str, int], base: dict[str, int], runs: int, floor: float) -> dict[str, float]:
    diff = {key: (count - base.get(key, 0)) / runs for key, count in now.items()}
    return {key: round(value, 2) for key, value in sorted(diff.items(), key=lambda kv: -kv[1]) if value >= floor}


def measure(levels: list[int], *, detail: bool, env: dict[str, str], keep: bool, heap: bool = False) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="wabot-waiting-"))
    ctx = Context(work=work, sizes=QUICK)
    env = {"BENCH_GC_DETAIL": "1" if detail else "0", "BENCH_HEAP": "1" if heap else "0", **env}
    out: dict[str, Any] = {"loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]), "levels": []}
    with stubs(ctx, "waiting") as s:
        settings = {
            "WABOT_REPLY_TIMEOUT": "1",
            "WABOT_FOLLOWUP_TIMEOUT": "3600",
            "WABOT_MAX_CONCURRENT_RUNS": "1000000",
            **env,
        }
        # The probe reads BENCH_GC_DETAIL from the bot's environment: start_bot passes `env` through.
        bot = start_bot(ctx.dir("waiting"), simulator=s.simulator.url, sink=s.sink.url, otlp=s.otlp.url, env=settings)
        with running(bot):
            run = new_run()
            warm_up(bot, run)
            base = _census(bot.log_path, bot.pid, detail, heap)
            base_rss = memory_kib(bot.pid)["VmRSS"]
            ramp = waiting_runs(ctx, bot, run, levels, label="waiting objects", timeout=120, concurrency=200)
            for _, in_flight in ramp:
                time.sleep(2.0)  # every webhook past its 1 s deadline: the runs wait on the model only
                census = _census(bot.log_path, bot.pid, detail, heap)
                runs = max(in_flight, 1)
                rss = memory_kib(bot.pid)["VmRSS"]
                row: dict[str, Any] = {
                    "in_flight": in_flight,
                    "tracked": census["tracked"],
                    "baseline": base["tracked"],
                    "per_run": round((census["tracked"] - base["tracked"]) / runs, 1),
                    "by_type": _per_run(census["top"], base["top"], runs, 0.05),
                    "rss_bytes_per_run": round((rss - base_rss) * 1024 / runs),
                }
                if heap:
                    now, then = census["heap"], base["heap"]
                    row["traced_bytes_per_run"] = round((now["traced"] - then["traced"]) / runs)
                    for key in ("by_file", "by_line"):
                        sizes = {where: size for where, (size, _count) in now[key].items()}
                        before = {where: size for where, (size, _count) in then[key].items()}
                        row[f"bytes_per_run_{key}"] = _per_run(sizes, before, runs, 50)
                if detail:
                    row["detail"] = _per_run(census["detail"]["keys"], base["detail"]["keys"], runs, 0.05)
                    row["owners"] = census["detail"]["owners"]
                out["levels"].append(row)
    if not keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        out["work"] = str(work)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--levels", type=int, nargs="+", default=[200, 1000], help="runs in flight to count at")
    parser.add_argument("--detail", action="store_true", help="name the objects (slow)")
    parser.add_argument("--heap", action="store_true", help="the bytes per run by line (tracemalloc: slow)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra bot setting")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (the bot's log)")
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    result = measure(sorted(args.levels), detail=args.detail, env=env, keep=args.keep, heap=args.heap)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"load average {result['loadavg']}")
    for row in result["levels"]:
        print(
            f"\n{row['in_flight']} in flight: {row['tracked']:,} tracked (0 in flight: {row['baseline']:,}), "
            f"{row['per_run']} per run"
        )
        for name, value in row["by_type"].items():
            print(f"  {value:8.2f}  {name}")
        print(f"  RSS per run: {row['rss_bytes_per_run']:,} bytes")
        if "traced_bytes_per_run" in row:
            print(f"  traced per run: {row['traced_bytes_per_run']:,} bytes; by file, then by line:")
            for name, value in [*row["bytes_per_run_by_file"].items(), *row["bytes_per_run_by_line"].items()]:
                print(f"  {value:10.0f}  {name}")
        for name, value in row.get("detail", {}).items():
            print(f"  {value:8.2f}  [{name}]  {row['owners'].get(name, '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
