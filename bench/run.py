"""`python -m bench.run`: run the benchmark scenarios and write docs/benchmarks.md (see `make bench`).

BENCH_QUICK=1 (or --quick) runs a short smoke version; --only picks scenarios; --profile adds py-spy summaries;
--json PATH also writes the raw results; --no-doc leaves docs/benchmarks.md alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import incident, instructions, loadgen, peers, report, scenarios
from bench.config import FULL, QUICK

SCENARIOS = {
    "generator": scenarios.generator_alone,
    "precision": scenarios.precision,
    "gc_levels": incident.gc_levels,
    "incident": incident.incident,
    "fast": scenarios.fast_path,
    "instructions": instructions.telemetry_cost,
    "peers": peers.peers,
    "drain": scenarios.drain,
    "memory": scenarios.memory,
    "scaling": scenarios.scaling,
}
# The scenarios whose load comes from wrk; the others send from this process (bench/burst.py).
_WRK_SCENARIOS = {"generator", "precision", "fast", "scaling"}
DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK", "") not in ("", "0"))
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--profile", action="store_true", help="sample the bot with py-spy during the runs")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--no-doc", action="store_true", help=f"do not write {DOC.name}")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, bodies, profiles)")
    parser.add_argument(
        "--merge",
        type=Path,
        metavar="JSON",
        help="the results of scenarios run earlier (another run's --json), reported with this run's; "
        "scenarios this run repeats are this run's",
    )
    parser.add_argument(
        "--incident",
        metavar="RATE,SECONDS,MODEL_S",
        help="the incident run's size instead of the full run's 100,60,60 (a reduced run on a loaded machine)",
    )
    args = parser.parse_args(argv)

    try:
        if set(args.only) & _WRK_SCENARIOS:
            loadgen.ensure_wrk()
        if "instructions" in args.only:
            instructions.ensure_callgrind()
    except (loadgen.GeneratorMissing, instructions.CallgrindMissing) as exc:
        print(exc, file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    if args.incident:
        rate, seconds, model_s = (float(part) for part in args.incident.split(","))
        sizes = dataclasses.replace(sizes, incident_rate=rate, incident_seconds=seconds, incident_model_s=model_s)
    work = Path(tempfile.mkdtemp(prefix="wabot-bench-"))
    ctx = scenarios.Context(work=work, sizes=sizes, profile=args.profile)
    command = "BENCH_QUICK=1 make bench" if args.quick and len(sys.argv) <= 1 else "make bench"
    if argv is not None or len(sys.argv) > 1:
        command = "python -m bench.run " + shlex.join(argv if argv is not None else sys.argv[1:])
    loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    results: dict[str, Any] = {"quick": args.quick, "sizes": sizes.__dict__, "command": command, "loadavg": loadavg}
    started = time.time()
    ctx.say(f"work directory {work}")
    for name in args.only:
        results[name] = SCENARIOS[name](ctx)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    results["elapsed_s"] = round(time.time() - started, 1)
    if args.merge:
        earlier = json.loads(args.merge.read_text())
        merged = [name for name in SCENARIOS if name in earlier and name not in results]
        results.update({name: earlier[name] for name in merged})
        results["merged"] = {
            "from": earlier.get("command", str(args.merge)),
            "loadavg": earlier.get("loadavg", "?"),
            "scenarios": merged,
        }
    results["profiles"] = ctx.profiles
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not args.no_doc:
        report.write(DOC, results, started)
        ctx.say(f"wrote {DOC}")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
