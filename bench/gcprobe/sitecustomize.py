"""Put on the bot's PYTHONPATH by the benchmark: logs every garbage-collector pause of 5 ms or more to stderr.

A pause stops the event loop, so it delays every webhook due meanwhile; the precision table counts them. The
callback itself costs about a microsecond per collection. (Only the benchmark's bot processes load this file.)
"""

import gc
import sys
import time

_MIN_PAUSE_S = 0.005
_started = [0.0]


def _pause(phase: str, info: dict) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    elapsed = time.perf_counter() - _started[0]
    if elapsed >= _MIN_PAUSE_S:
        sys.stderr.write(f"BENCH_GC_PAUSE gen={info['generation']} ms={elapsed * 1000:.1f} at={time.monotonic():.3f}\n")


gc.callbacks.append(_pause)
