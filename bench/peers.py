"""Issue #16's comparison: wabot against a minimal bot (bench/peer_bot.py) on the same uvicorn stack, same load.

Two measures, both bots in one run: the fast path under wrk (rounds interleaved, CPU per message), and the
instructions per message under callgrind (bench/instructions.py's method), which the machine's other load does not
move. Without wrk installed only the second runs (the result says so).
"""

from __future__ import annotations

import shutil
from typing import Any

from bench import instructions
from bench.botproc import start_peer
from bench.scenarios import FAST_CONFIGS, Context, _bot, _fast_rounds, stubs


def peers(ctx: Context, rounds: int = 3) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if shutil.which("wrk"):
        with stubs(ctx, "peers") as s:
            targets = {}
            try:
                where = ctx.dir("peers-minimal")
                targets["minimal bot"] = start_peer(where, simulator=s.simulator.url, sink=s.sink.url)
                targets["wabot, full telemetry"] = _bot(ctx, "peers-wabot-full", s, **FAST_CONFIGS["full"])
                targets["wabot, telemetry off"] = _bot(ctx, "peers-wabot-off", s, **FAST_CONFIGS["telemetry off"])
                # The minimal bot sends no typing indicator; wabot sends one per message (a Twilio call, started
                # before the answer is ready and cancelled when it is): its share of the difference.
                targets["wabot, telemetry off, no typing indicator"] = _bot(
                    ctx, "peers-wabot-off-no-typing", s, WABOT_TYPING_INDICATOR="false", **FAST_CONFIGS["telemetry off"]
                )
                bots = set(targets) - {"minimal bot"}
                result["fast"] = {
                    "connections": ctx.sizes.fast_connections,
                    "seconds": ctx.sizes.fast_seconds,
                    "runs": _fast_rounds(ctx, "peers", targets, rounds, bots=bots),
                }
            finally:
                for proc in targets.values():
                    proc.stop()
    else:
        result["fast"] = None
        ctx.say("peers: wrk is not installed, only the instruction counts run")
    result["instructions"] = instructions.peers_cost(ctx)
    return result
