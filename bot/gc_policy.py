"""When the garbage collector may walk the whole heap: not while thousands of runs wait on a slow model.

A full (generation 2) collection stops the event loop while it walks every tracked object. When the model is slow
for everyone (an OpenAI incident) runs in flight pile up, and at 5,000 of them a full pass walked ~0.5 M objects
for ~0.5 s: every holding reply due meanwhile left late (docs/benchmarks.md). Those passes found next to nothing:
what the bot allocates is freed by reference counting. So in a serving process (`wabot serve`; apps the tests build
in-process keep Python's defaults):

- what start-up and the warm-up built (imports, the app, the SDK's validators) is frozen, never walked again;
- the allocator never starts a full pass (young collections stay automatic: they walk only young objects);
- this module's watcher runs one from the event loop when few runs are in flight, so it walks little, and at the
  latest every `max_interval_s` whatever the load, so that garbage in reference cycles cannot pile up unbounded.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable

# A generation-2 threshold the allocator never reaches: it counts generation-1 collections (one per ~7,000 net
# allocations with the default young thresholds), so this is billions of allocations.
_NEVER = 1_000_000_000


class GcPolicy:
    """Full collections on the bot's schedule instead of the allocator's."""

    def __init__(
        self,
        *,
        quiet_runs: int = 100,
        min_interval_s: float = 60.0,
        max_interval_s: float = 900.0,
        check_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.quiet_runs = quiet_runs
        self.min_interval_s = min_interval_s
        self.max_interval_s = max_interval_s
        self.check_s = check_s
        self._clock = clock
        self._last_full = clock()
        self.full_passes = 0

    def take_over(self) -> None:
        """Automatic full passes off, young ones unchanged."""
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, _NEVER)

    @staticmethod
    def freeze() -> None:
        """Everything alive now lives as long as the process (called after start-up and after the warm-up)."""
        gc.collect()
        gc.freeze()

    def due(self, runs_in_flight: int) -> bool:
        """Whether a full pass should run now."""
        since = self._clock() - self._last_full
        if since >= self.max_interval_s:
            return True
        return since >= self.min_interval_s and runs_in_flight <= self.quiet_runs

    def collect(self) -> None:
        gc.collect()
        self._last_full = self._clock()
        self.full_passes += 1

    async def watch(self, runs_in_flight: Callable[[], int]) -> None:
        """Run full passes when `due`, until cancelled."""
        while True:
            await asyncio.sleep(self.check_s)
            if self.due(runs_in_flight()):
                self.collect()
