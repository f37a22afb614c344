"""Put on the bot's PYTHONPATH by the benchmark: what the garbage collector and the event loop did, on stderr.

- `BENCH_GC_PAUSE gen= ms= cpu_ms= collected= at=`: every collection of 5 ms or more, and every full (generation 2)
  one whatever its length. `ms` is wall time (the loop stands still that long); `cpu_ms` the collector's own CPU
  time (time.thread_time), which other processes on a loaded machine do not inflate.
- `BENCH_LOOP_STALL ms= at=`: the event loop came back 5 ms or more after a 10 ms sleep (any cause: a collection,
  a long callback, or the machine's other load). Started from the first collection that runs inside a loop; not
  with BENCH_LOOP_STALLS=0 (the instruction counts: its wake-ups would add instructions in proportion to wall time).
- On SIGUSR2 (sent by bench/gcscale.py): `BENCH_GC_OBJECTS {json}`, the tracked objects by type and generation,
  then one forced full collection, timed like the others: what a full pass costs with what is in flight now.
  With BENCH_GC_DETAIL=1 (bench/waiting_objects.py) it first writes `BENCH_GC_DETAIL {json}`: which coroutines,
  functions, cells' contents, spans and dicts' owners those objects are, so a per-run count can be traced to code.
  With BENCH_HEAP=1 (bench/waiting_objects.py --heap) every allocation is traced from start-up (tracemalloc, one
  frame) and it first writes `BENCH_HEAP {json}`: the bytes and blocks alive by file and by line, and in all, so a
  per-run memory figure can be traced to code too (slow: a traced process runs several times slower).

A callback costs about a microsecond per collection. Only the benchmark's bot processes load this file.
"""

import asyncio
import collections
import gc
import json
import os
import signal
import sys
import threading
import time

_MIN_PAUSE_S = 0.005
_LAG_PERIOD_S = 0.010
_started = [0.0, 0.0]
_monitor = []
_WATCH_LOOP = os.environ.get("BENCH_LOOP_STALLS", "1") != "0"
_DETAIL = os.environ.get("BENCH_GC_DETAIL", "0") != "0"
_HEAP = os.environ.get("BENCH_HEAP", "0") != "0"
if _HEAP:
    import tracemalloc

    tracemalloc.start(1)


async def _watch_loop() -> None:
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(_LAG_PERIOD_S)
        lag = loop.time() - before - _LAG_PERIOD_S
        if lag >= _MIN_PAUSE_S:
            sys.stderr.write(f"BENCH_LOOP_STALL ms={lag * 1000:.1f} at={time.monotonic():.3f}\n")


def _start_monitor() -> None:
    if _monitor or threading.current_thread() is not threading.main_thread() or not _WATCH_LOOP:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    _monitor.append(loop)
    loop.call_soon(lambda: _monitor.append(loop.create_task(_watch_loop())))


def _pause(phase: str, info: dict) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        _started[1] = time.thread_time()
        return
    elapsed = time.perf_counter() - _started[0]
    cpu = time.thread_time() - _started[1]
    if elapsed >= _MIN_PAUSE_S or info["generation"] == 2:
        sys.stderr.write(
            f"BENCH_GC_PAUSE gen={info['generation']} ms={elapsed * 1000:.1f} cpu_ms={cpu * 1000:.1f} "
            f"collected={info['collected']} at={time.monotonic():.3f}\n"
        )
    if not _monitor:
        _start_monitor()


def _name(obj: object) -> str:
    return type(obj).__module__ + "." + type(obj).__qualname__


def _detail(objects: list) -> dict:
    """Finer keys than the type for the objects a waiting run holds; owners found through gc.get_referrers on a
    sample (slow: each call walks the whole heap), by the referrer's type (a dict's owner: the type of whatever
    refers to the dict)."""
    keys: collections.Counter = collections.Counter()
    samples: dict[str, list] = collections.defaultdict(list)
    for obj in objects:
        kind = type(obj).__qualname__
        if kind == "coroutine":
            key = "coroutine " + obj.cr_code.co_qualname
        elif kind == "function":
            key = "function " + obj.__qualname__
        elif kind in ("generator", "async_generator"):
            code = getattr(obj, "gi_code", None) or getattr(obj, "ag_code", None)
            key = kind + " " + (code.co_qualname if code else "?")
        elif kind == "method":
            key = "method " + getattr(obj.__func__, "__qualname__", "?")
        elif kind == "cell":
            try:
                key = "cell -> " + _name(obj.cell_contents)
            except ValueError:
                key = "cell -> (empty)"
        elif kind == "_Span":
            key = "_Span " + obj.name
        elif kind == "Task":
            coro = obj.get_coro()
            key = "Task " + (coro.cr_code.co_qualname if hasattr(coro, "cr_code") else type(coro).__qualname__)
        else:
            key = _name(obj)
        keys[key] += 1
        if len(samples[key]) < 3:
            samples[key].append(obj)
    owners: dict[str, dict[str, int]] = {}
    frame_types = (type(sys._getframe()),)
    for key, count in keys.most_common(80):
        if count < 200:
            break
        found: collections.Counter = collections.Counter()
        for obj in samples[key]:
            for ref in gc.get_referrers(obj):
                if ref is objects or ref is samples[key] or isinstance(ref, frame_types):
                    continue
                owner = _name(ref)
                if type(ref).__qualname__ == "dict":
                    # A dict refers to it: name the dict by what holds the dict (an instance's __dict__, a frame...).
                    holders = [_name(h) for h in gc.get_referrers(ref) if h is not objects and not isinstance(h, list)]
                    owner += " in " + ",".join(sorted(set(holders))[:3])
                elif type(ref).__qualname__ == "coroutine":
                    owner += " " + ref.cr_code.co_qualname
                elif type(ref).__qualname__ == "cell":
                    owner += " (closure)"
                found[owner] += 1
        owners[key] = dict(found.most_common(6))
    return {"keys": dict(keys.most_common(250)), "owners": owners}


def _heap() -> dict:
    gc.collect()
    snapshot = tracemalloc.take_snapshot()

    def top(key: str, n: int) -> dict:
        stats = snapshot.statistics(key)[:n]
        return {
            f"{s.traceback[0].filename}:{s.traceback[0].lineno}" if key == "lineno" else s.traceback[0].filename: [
                s.size,
                s.count,
            ]
            for s in stats
        }

    traced, _peak = tracemalloc.get_traced_memory()
    return {"traced": traced, "by_file": top("filename", 60), "by_line": top("lineno", 120)}


def _census(*_: object) -> None:
    if _HEAP:
        record = _heap()
        record["at"] = round(time.monotonic(), 3)
        sys.stderr.write("BENCH_HEAP " + json.dumps(record) + "\n")
    if _DETAIL:
        record = _detail(gc.get_objects())
        record["at"] = round(time.monotonic(), 3)
        sys.stderr.write("BENCH_GC_DETAIL " + json.dumps(record) + "\n")
    by_type = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    per_gen = [len(gc.get_objects(g)) for g in range(3)]
    record = {
        "tracked": sum(per_gen),
        "generations": per_gen,
        "frozen": gc.get_freeze_count(),
        "threshold": gc.get_threshold(),
        "top": dict(by_type.most_common(150)),
        "at": round(time.monotonic(), 3),
    }
    sys.stderr.write("BENCH_GC_OBJECTS " + json.dumps(record) + "\n")
    gc.collect()
    sys.stderr.flush()


gc.callbacks.append(_pause)
signal.signal(signal.SIGUSR2, _census)
