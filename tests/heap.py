"""What the suite's two heap tests (tests/test_memory.py, and tests/test_fuzz_webhook.py's memory test) share: the
allocations that are not the bot's to answer for, and a snapshot taken once a bot served in this process has let
go of everything its last requests left behind for a while.

Both tests trace every allocation of the process and compare two snapshots: a leak of one object per request is one
more block per request. What moves between two snapshots without a leak has to be small against that, so the tests
can stay short; the causes found so far are settled here rather than measured around.
"""

from __future__ import annotations

import asyncio
import gc
import http.client
import inspect
import sys
import tracemalloc
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx2

from bot.demo.loopback import LoopbackServer
from tests.waiting import wait_until

FUTURE_ITERATORS_KEPT = 255  # C asyncio's free list of future iterators, at most (see _fill_future_iterator_freelist)
PROBE_TIMEOUT_S = 30.0  # each probe's connect and each read: a loaded bot under tracemalloc answers 150 in seconds


def _line_of(function: Callable[..., Any], text: str) -> int:
    lines, first = inspect.getsourcelines(function)
    return first + next(i for i, line in enumerate(lines) if text in line)


# Not counted, each for its reason, in both tests. Everything else the process allocates counts, the bot's code and
# every library it calls included, and the test's own allocations too.
NOT_THE_BOTS = [
    # The test's bookkeeping: conftest's LogLines keeps every log line of the session.
    tracemalloc.Filter(False, "*/tests/conftest.py"),
    # OpenTelemetry's objects, and FastAPI's own for the server span: recent requests' contexts, and so their spans,
    # live on in timers for seconds (see _drop_cancelled_timers).
    tracemalloc.Filter(False, "*/opentelemetry/*"),
    tracemalloc.Filter(False, "*/fastapi/telemetry/*"),
    # The timers and contexts themselves (contextvars.copy_context() in Handle.__init__), and the float of when each
    # timer made by call_later falls due (uvicorn's keep-alive timers: 7 at one snapshot and 64 at the next, in a
    # `make test` that failed at +183 blocks). Futures, tasks, and whatever else asyncio allocates count.
    tracemalloc.Filter(False, asyncio.base_events.__file__, _line_of(asyncio.BaseEventLoop.call_at, "TimerHandle(")),
    tracemalloc.Filter(False, asyncio.base_events.__file__, _line_of(asyncio.BaseEventLoop.call_later, "self.time()")),
    tracemalloc.Filter(False, asyncio.events.__file__, _line_of(asyncio.Handle.__init__, "copy_context()")),
    tracemalloc.Filter(False, tracemalloc.__file__),
]


def _drop_cancelled_timers(url: str, probes: int = 150) -> None:
    """Make the bot's event loop forget the timers cancelled during the last requests.

    asyncio keeps a cancelled timer in its heap until it falls due, and with it the context it was scheduled in: a
    webhook's span and request telemetry, a run's context variables. Every webhook, model call and Twilio call leaves
    one or two (asyncio.timeout, wait_for, uvicorn's keep-alive) for up to 10 s, between 5 and 70 of them at a
    snapshot: up to 30 KB more or less from one snapshot to the next, measured. The loop drops all of them at once when
    cancelled timers are over half of more than 100. Probes on kept-alive connections, closed together, cancel 150
    keep-alive timers of their own: enough for the loop to drop the batch's (checked: the loop then holds 76-106
    cancelled timers, the probes'), and their contexts hold next to nothing (/healthz is not traced).

    The probes are the standard library's blocking connections, not an asyncio client: one in this process left its
    own objects in the traced heap (an aiohttp session's futures and parsed responses, 150-280 blocks at each
    snapshot, 38 more at one than at the other in a `make test` that failed at +183 blocks).
    """
    address = urlsplit(url)
    connections = [
        http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port, timeout=PROBE_TIMEOUT_S)
        for _ in range(probes)
    ]
    try:
        for connection in connections:
            connection.request("GET", "/healthz")
        for connection in connections:
            response = connection.getresponse()
            response.read()  # the whole response read, the connection stays open
            assert response.status == 200, (response.status, response.reason)
    finally:
        for connection in connections:
            connection.close()


def settled_snapshot(server: LoopbackServer, client: httpx2.Client) -> tracemalloc.Snapshot:
    """A snapshot of the traced heap with the bot `server` serves idle and nothing transient left in it that can be let
    go. `client` is the test's own client of the bot: its one kept-alive connection is there at every snapshot."""
    _drop_cancelled_timers(server.url)
    # The probes close their connections at once; the server lets go of each (its protocol, its transport, the
    # keep-alive timer it cancels) only when its loop reads the close, which a loaded machine delays. A snapshot
    # taken before then counted them: +85 timers and +58 accepts over the one before, in a `make test`.
    wait_until(lambda: server.open_connections() <= 1, 10.0, "the bot to close the probes' connections", 0.01)
    client.get(f"{server.url}/healthz")  # the server has finished the last request, on a loop turn after the closes
    gc.collect()
    # The interpreter's attribute cache (4,096 entries) holds a reference to the name of each lookup it remembers:
    # names made at run time (reprlib's 'repr_' + type name, and names inside ElementTree, re and structlog) stay
    # alive until their entry is reused. Hundreds of such strings, a different number at each snapshot: most of what
    # both tests saw as growth without a leak. Cleared, every block at those lines is gone (measured).
    # (Python 3.13 renamed the call and deprecated the old name; 3.11 and 3.12 have only the old one.)
    clear = getattr(sys, "_clear_internal_caches", None) or sys._clear_type_cache
    clear()
    _fill_future_iterator_freelist()
    return tracemalloc.take_snapshot()


def _fill_future_iterator_freelist() -> None:
    """Leave asyncio's free list of future iterators full, and full of blocks made here.

    Each `await` on a future makes an iterator (40 bytes); when it dies, C asyncio keeps it for reuse, up to 255 of
    them, and tracemalloc counts a kept one at the line whose `await` first made it. How many it keeps depends on how
    many futures were awaited at once before a snapshot: the two `await waiter` lines of asyncio's tasks.py and
    selector_events.py held 159 at one snapshot, 90 more than at the other, of a `make test` that failed at +165
    blocks. Made here four times as many at once, the first up to 255 taken from the list, then dropped newest first:
    the list is full of 255 made at the same line at every snapshot, and everything it held before is freed. Checked on
    Python 3.11, 3.12 and 3.13, with the awaits on another thread's loop: the list is one for all threads, so this
    thread's iterators fill the one the bot's loop uses.
    """
    loop = asyncio.new_event_loop()
    try:
        iterators = [loop.create_future().__await__() for _ in range(4 * FUTURE_ITERATORS_KEPT)]
        while iterators:
            iterators.pop()
    finally:
        loop.close()
