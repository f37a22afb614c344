"""SQLite store through aiosqlite: one file, WAL mode, fine for a single bot process."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import time
from pathlib import Path

import aiosqlite

from bot.ordering import UserLanes
from bot.store.base import PendingReply

_SCHEMA = """
CREATE TABLE IF NOT EXISTS processed (key TEXT PRIMARY KEY, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS processed_expiry ON processed (expires_at);
CREATE TABLE IF NOT EXISTS conversations (user_key TEXT PRIMARY KEY, response_id TEXT, updated_at REAL);
CREATE TABLE IF NOT EXISTS pending (
    sid TEXT PRIMARY KEY,
    to_addr TEXT NOT NULL,
    user_key TEXT NOT NULL,
    prompt TEXT NOT NULL,
    arrived_at REAL NOT NULL,
    answer_parts TEXT,
    kind TEXT,
    parts_sent INTEGER NOT NULL DEFAULT 0,
    traceparent TEXT
);
"""
_PURGE_EVERY_S = 60.0


class SQLiteStore:
    """The Store interface on one SQLite file."""

    def __init__(self, db: aiosqlite.Connection, dedupe_ttl_s: float, path: str) -> None:
        self._db = db
        self._path = path
        self._recovery_lock: int | None = None
        self._recovery_claimed = False
        self._lanes = UserLanes()
        self._rate_window = 0
        self._rate_counts: dict[str, int] = {}
        self._ttl = dedupe_ttl_s
        self._last_purge = 0.0
        # One connection is shared by all coroutines: a statement issued while another coroutine holds a
        # transaction open would silently join (and maybe roll back with) it, so every call takes this lock.
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str, dedupe_ttl_s: float) -> SQLiteStore:
        if path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None, timeout=5.0)
        # WAL + NORMAL: a crash loses at most the last transaction's fsync, never corrupts; busy_timeout
        # makes a briefly locked file wait instead of failing the webhook.
        # busy_timeout first: several workers opening one file at once must wait for each other, not fail.
        await db.execute("PRAGMA busy_timeout=5000")
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.executescript(_SCHEMA)
        return cls(db, dedupe_ttl_s, path)

    async def _purge_expired(self, now: float) -> None:
        if now - self._last_purge >= _PURGE_EVERY_S:
            self._last_purge = now
            await self._db.execute("DELETE FROM processed WHERE expires_at < ?", (now,))

    async def accept(self, reply: PendingReply, idempotency_token: str | None = None) -> bool:
        async with self._lock:
            return await self._accept(reply, idempotency_token)

    async def _accept(self, reply: PendingReply, idempotency_token: str | None) -> bool:
        now = time.time()
        await self._purge_expired(now)
        keys = [f"sid:{reply.sid}"] + ([f"tok:{idempotency_token}"] if idempotency_token else [])
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            marks = ",".join("?" * len(keys))
            async with self._db.execute(
                f"SELECT 1 FROM processed WHERE key IN ({marks}) AND expires_at >= ?", (*keys, now)
            ) as cur:
                if await cur.fetchone():
                    await self._db.execute("ROLLBACK")
                    return False
            await self._db.executemany(
                "INSERT OR REPLACE INTO processed (key, expires_at) VALUES (?, ?)",
                [(key, now + self._ttl) for key in keys],
            )
            await self._db.execute(
                "INSERT OR REPLACE INTO pending (sid, to_addr, user_key, prompt, arrived_at, traceparent) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (reply.sid, reply.to, reply.user_key, reply.prompt, reply.arrived_at, reply.traceparent),
            )
            await self._db.execute("COMMIT")
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise
        return True

    async def _write(self, sql: str, params: tuple[object, ...]) -> None:
        async with self._lock:
            await self._db.execute(sql, params)

    async def drop(self, sid: str) -> None:
        await self._write("DELETE FROM pending WHERE sid = ?", (sid,))

    async def save_answer(self, sid: str, parts: list[str], kind: str) -> None:
        await self._write("UPDATE pending SET answer_parts = ?, kind = ? WHERE sid = ?", (json.dumps(parts), kind, sid))

    async def mark_sent(self, sid: str, parts_sent: int) -> None:
        await self._write("UPDATE pending SET parts_sent = ? WHERE sid = ?", (parts_sent, sid))

    async def finish(self, sid: str) -> None:
        await self.drop(sid)

    async def pending(self) -> list[PendingReply]:
        async with self._db.execute(
            "SELECT sid, to_addr, user_key, prompt, arrived_at, answer_parts, kind, parts_sent, traceparent "
            "FROM pending ORDER BY arrived_at"
        ) as cur:
            rows = await cur.fetchall()
        return [
            PendingReply(
                sid=row[0],
                to=row[1],
                user_key=row[2],
                prompt=row[3],
                arrived_at=row[4],
                answer_parts=json.loads(row[5]) if row[5] else None,
                kind=row[6],
                parts_sent=row[7],
                traceparent=row[8],
            )
            for row in rows
        ]

    async def count_message(self, user_key: str, window_s: int) -> int:
        # One process owns a SQLite store, so the counts live in memory; a restart forgets them, which only
        # means a user briefly gets a fresh allowance.
        window = int(time.time() // window_s)
        if window != self._rate_window:
            self._rate_window, self._rate_counts = window, {}
        self._rate_counts[user_key] = self._rate_counts.get(user_key, 0) + 1
        return self._rate_counts[user_key]

    async def get_conversation(self, user_key: str) -> str | None:
        async with self._db.execute("SELECT response_id FROM conversations WHERE user_key = ?", (user_key,)) as cur:
            row = await cur.fetchone()
        return row[0] if row else None

    async def set_conversation(self, user_key: str, response_id: str | None) -> None:
        await self._write(
            "INSERT INTO conversations (user_key, response_id, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT(user_key) DO UPDATE SET response_id = excluded.response_id, "
            "updated_at = excluded.updated_at",
            (user_key, response_id, time.time()),
        )

    async def claim_orphans(self) -> list[PendingReply]:
        # Only the first call of a process can find orphans: later entries belong to this process's own runs.
        # An advisory lock next to the database, held for the life of the process, makes exactly one of several
        # workers on one file the one that resumes the journal.
        if self._recovery_claimed or not self._take_recovery_lock():
            return []
        self._recovery_claimed = True
        return await self.pending()

    def _take_recovery_lock(self) -> bool:
        if self._path == ":memory:":
            return True
        fd = os.open(f"{self._path}.recovery-lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._recovery_lock = fd
        return True

    def lanes(self) -> UserLanes:
        return self._lanes

    async def ping(self) -> None:
        async with self._db.execute("SELECT 1") as cur:
            await cur.fetchone()

    async def close(self) -> None:
        await self._db.close()
        if self._recovery_lock is not None:
            os.close(self._recovery_lock)
            self._recovery_lock = None
