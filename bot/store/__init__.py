"""Where the bot keeps what must survive a restart: processed message ids, conversation state, pending replies.

The store is a small interface with one implementation per backend (`sqlite:///path`, `redis://...`);
`open_store(url)` picks it from `WABOT_STORE`.
"""

from __future__ import annotations

from bot.store.base import PendingReply, Store, guarded


async def open_store(url: str, *, dedupe_ttl_s: float, lease_s: float = 10.0) -> Store:
    """Open (and create when needed) the store named by a `WABOT_STORE` URL."""
    if url.startswith("sqlite://"):
        from bot.store.sqlite import SQLiteStore

        return await SQLiteStore.open(url.removeprefix("sqlite://").removeprefix("/") or ":memory:", dedupe_ttl_s)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from bot.store.redis import RedisStore

        return await RedisStore.open(url, dedupe_ttl_s, lease_s)
    raise ValueError(f"WABOT_STORE={url!r}: expected sqlite:///path/to/file.db or redis://host:port/db")


__all__ = ["PendingReply", "Store", "guarded", "open_store"]
