"""Where the bot keeps what must survive a restart: processed message ids, conversation state, pending replies.

The store is a small interface with one implementation per backend (`sqlite:///path`, `redis://...`);
`open_store(url)` picks it from `WABOT_STORE`.

A SQLite URL may say how long a write waits for another process's lock before failing (the webhook then answers
without deduplication or journal): `sqlite:///wabot.db?busy_timeout_ms=5000` (the default).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import parse_qsl

from bot.store.base import OwedReply, Store, StoreUnavailable, guarded


async def open_store(
    url: str,
    *,
    dedupe_ttl_s: float,
    lease_s: float = 10.0,
    clock: Callable[[], float] = time.time,
    conversation_ttl_s: float = 24 * 3600,
) -> Store:
    """Open (and create when needed) the store named by a `WABOT_STORE` URL. `clock` (wall-clock seconds) places
    the per-user rate-limit windows and ages conversations (which end after `conversation_ttl_s` of silence); tests
    pass one they drive instead of waiting for the next minute or day."""
    if url.startswith("sqlite://"):
        from bot.store.sqlite import SQLiteStore

        path, _, query = url.removeprefix("sqlite://").removeprefix("/").partition("?")
        options = dict(parse_qsl(query, keep_blank_values=True))
        busy_timeout = options.pop("busy_timeout_ms", "5000")
        if options or not busy_timeout.isdigit():
            raise ValueError(f"WABOT_STORE={url!r}: the only SQLite option is busy_timeout_ms=<milliseconds>")
        return await SQLiteStore.open(
            path or ":memory:",
            dedupe_ttl_s,
            busy_timeout_ms=int(busy_timeout),
            clock=clock,
            conversation_ttl_s=conversation_ttl_s,
        )
    if url.startswith(("redis://", "rediss://", "unix://")):
        from bot.store.redis import RedisStore

        return await RedisStore.open(url, dedupe_ttl_s, lease_s, clock=clock, conversation_ttl_s=conversation_ttl_s)
    raise ValueError(f"WABOT_STORE={url!r}: expected sqlite:///path/to/file.db or redis://host:port/db")


__all__ = ["OwedReply", "Store", "StoreUnavailable", "guarded", "open_store"]
