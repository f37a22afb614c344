"""The serving process's garbage-collector policy (bot/gc_policy.py): the allocator never starts a full collection,
the policy runs one when few runs are in flight, and at the latest after its longest interval whatever the load."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import pytest

from bot.gc_policy import GcPolicy


@pytest.fixture
def full_passes() -> Iterator[list[int]]:
    """Every generation-2 collection from here on (the count of the list); Python's settings restored after."""
    seen: list[int] = []

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info["generation"] == 2:
            seen.append(info["collected"])

    threshold = gc.get_threshold()
    gc.callbacks.append(callback)
    try:
        yield seen
    finally:
        gc.callbacks.remove(callback)
        gc.set_threshold(*threshold)


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _allocate_cycles(count: int) -> list[_Node]:
    nodes = []
    for _ in range(count):
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        nodes.append(a)
    return nodes


def test_the_allocator_starts_no_full_collection_but_young_ones_run(full_passes: list[int]) -> None:
    young_before = gc.get_stats()[0]["collections"]
    GcPolicy().take_over()
    # With Python's thresholds (700, 10, 10) a million objects in cycles make several full collections.
    for _ in range(50):
        _allocate_cycles(10_000)  # garbage at once, in cycles: only a collection frees it
    assert full_passes == []
    assert gc.get_stats()[0]["collections"] > young_before + 100


def test_a_full_collection_runs_when_few_runs_are_in_flight(full_passes: list[int]) -> None:
    now = [0.0]
    policy = GcPolicy(quiet_runs=100, min_interval_s=60, max_interval_s=900, check_s=0.01, clock=lambda: now[0])
    policy.take_over()
    in_flight = [5000]

    async def scenario() -> None:
        watcher = asyncio.create_task(policy.watch(lambda: in_flight[0]))
        try:
            now[0] = 120.0  # past the shortest interval, but 5,000 runs wait on the model: no full pass
            await asyncio.sleep(0.1)
            assert full_passes == []
            in_flight[0] = 40  # the incident is over
            for _ in range(100):
                if full_passes:
                    break
                await asyncio.sleep(0.01)
        finally:
            watcher.cancel()

    asyncio.run(scenario())
    assert len(full_passes) == 1
    assert policy.full_passes == 1


def test_under_load_a_full_collection_still_comes_after_the_longest_interval(full_passes: list[int]) -> None:
    now = [0.0]
    policy = GcPolicy(quiet_runs=100, min_interval_s=60, max_interval_s=900, clock=lambda: now[0])
    policy.take_over()
    assert not policy.due(5000)
    now[0] = 899.0
    assert not policy.due(5000)
    cycles = _allocate_cycles(1000)
    gc.collect(1)  # a young collection moves them to the oldest generation, where only a full pass looks
    del cycles  # now garbage, in cycles
    now[0] = 900.0
    assert policy.due(5000)
    policy.collect()
    assert len(full_passes) == 1 and full_passes[0] >= 2000  # the cycles were freed
    assert not policy.due(5000)  # the interval starts again
