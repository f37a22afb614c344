"""A burst of webhooks from this process (aiohttp), for the scenarios that need a fixed set of messages in flight
(follow-up drain, memory) rather than a rate: what they measure happens in the bot after the webhooks returned.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp


@dataclass(frozen=True)
class BurstResult:
    sent: int
    ok: int  # HTTP 200
    seconds: float  # first request sent to last response
    latencies: list[float]


async def _burst(
    url: str, make: Callable[[int], tuple[str, str]], count: int, concurrency: int, rate: float | None
) -> BurstResult:
    gate = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    first = loop.time()
    latencies: list[float] = []
    ok = 0
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal ok
        if rate:
            # Paced: message i leaves at i / rate, so the bot takes each one in as it comes instead of queueing.
            await asyncio.sleep(max(0.0, first + i / rate - loop.time()))
        async with gate:
            # Signed here, not in advance: `make` may put the send time into the body (the drain's model delays).
            signature, body = make(i)
            headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature}
            started = time.monotonic()
            async with session.post(url, data=body.encode(), headers=headers) as response:
                await response.read()
                ok += response.status == 200
            latencies.append(time.monotonic() - started)

    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(one(session, i) for i in range(count)))
    return BurstResult(sent=count, ok=ok, seconds=time.monotonic() - started, latencies=latencies)


def burst(
    url: str, make: Callable[[int], tuple[str, str]], count: int, *, concurrency: int = 500, rate: float | None = None
) -> BurstResult:
    """POST `count` webhooks built by `make(i)` -> (signature, body), at most `concurrency` at a time and, with
    `rate`, no faster than `rate` a second."""
    return asyncio.run(_burst(url, make, count, concurrency, rate))
