"""SQLite store through aiosqlite: one file, WAL mode, shared by the worker processes of one bot (`--workers N`).

When the file refuses a write (another process holds the lock past the busy timeout, the disk is full), the store
fails every write at once for a short pause instead of letting each caller wait out its own busy timeout in turn:
one connection serves every coroutine, so those waits would add up and hold webhooks past Twilio's 15 s. Journal
entries that could not be closed then are closed as soon as the file takes writes again, so a restart does not
send their answers a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosqlite

from bot.ordering import UserLanes
from bot.store.base import OwedReply, StoreUnavailable, counted, media_from_json, media_to_json
from telemetry.logging import get_logger

_SCHEMA = """
CREATE TABLE IF NOT EXISTS processed (key TEXT PRIMARY KEY, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS processed_expiry ON processed (expires_at);
CREATE TABLE IF NOT EXISTS conversations (user_key TEXT PRIMARY KEY, response_id TEXT, updated_at REAL);
CREATE INDEX IF NOT EXISTS conversations_age ON conversations (updated_at);
CREATE TABLE IF NOT EXISTS pending (
    sid TEXT PRIMARY KEY,
    to_addr TEXT NOT NULL,
    user_key TEXT NOT NULL,
    prompt TEXT NOT NULL,
    arrived_at REAL NOT NULL,
    answer_parts TEXT,
    kind TEXT,
    parts_sent INTEGER NOT NULL DEFAULT 0,
    traceparent TEXT,
    media TEXT
);
CREATE TABLE IF NOT EXISTS rate_counts (user_key TEXT PRIMARY KEY, window INTEGER NOT NULL, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS user_tokens (
    user_key TEXT PRIMARY KEY, day INTEGER NOT NULL, tokens INTEGER NOT NULL, noticed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS user_tokens_day ON user_tokens (day);
"""
_DAY_S = 86_400
_PURGE_EVERY_S = 60.0
_KEYS_PER_QUERY = 500  # well under SQLite's limit on bound parameters
# After a refused write, how long writes fail at once before one of them tries (and maybe waits) again.
_UNWRITABLE_PAUSE_S = 1.0
# How often journal entries that could not be closed are tried again.
_RETRY_OWED_S = 1.0
_log = get_logger("wabot")


def _fail_waiters(waiters: list[asyncio.Future[Any]], exc: BaseException) -> None:
    failure = exc if isinstance(exc, Exception) else RuntimeError("accept batch interrupted")
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(failure)


class SQLiteStore:
    """The Store interface on one SQLite file."""

    def __init__(
        self,
        db: aiosqlite.Connection,
        dedupe_ttl_s: float,
        path: str,
        clock: Callable[[], float] = time.time,
        conversation_ttl_s: float = 24 * 3600,
    ) -> None:
        self._db = db
        self._clock = clock
        self._conversation_ttl = conversation_ttl_s
        self._path = path
        self._recovery_lock: int | None = None
        self._recovery_claimed = False
        self._lanes = UserLanes()
        self._counts: list[tuple[str, int, asyncio.Future[int]]] = []
        self._token_reads: list[tuple[str, asyncio.Future[int]]] = []
        self._ttl = dedupe_ttl_s
        self._last_purge = 0.0
        self._last_conversation_purge = -math.inf
        # One connection is shared by all coroutines: a statement issued while another coroutine holds a
        # transaction open would silently join (and maybe roll back with) it, so every call takes this lock.
        self._lock = asyncio.Lock()
        self._accepts: list[tuple[OwedReply, str | None, asyncio.Future[bool]]] = []
        self._unwritable_until = 0.0
        self._owed_deletes: set[str] = set()
        self._retry_owed_task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        path: str,
        dedupe_ttl_s: float,
        *,
        busy_timeout_ms: int = 5000,
        clock: Callable[[], float] = time.time,
        conversation_ttl_s: float = 24 * 3600,
    ) -> SQLiteStore:
        if path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            # It holds the prompts of owed replies: owner-only. SQLite gives its -wal and -shm the same mode.
            os.close(os.open(Path(path).expanduser(), os.O_CREAT | os.O_RDWR, 0o600))
        db = await aiosqlite.connect(path, isolation_level=None, timeout=busy_timeout_ms / 1000)
        # WAL + NORMAL: a crash loses at most the last transaction's fsync, never corrupts; busy_timeout
        # makes a briefly locked file wait instead of failing the webhook.
        # busy_timeout first: several workers opening one file at once must wait for each other, not fail.
        await db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.executescript(_SCHEMA)
        async with db.execute("PRAGMA table_info(pending)") as cur:
            columns = {row[1] for row in await cur.fetchall()}
        if "media" not in columns:
            # A journal written before attachments were journaled.
            await db.execute("ALTER TABLE pending ADD COLUMN media TEXT")
        return cls(db, dedupe_ttl_s, path, clock, conversation_ttl_s)

    async def _purge_expired(self, now: float) -> None:
        if now - self._last_purge >= _PURGE_EVERY_S:
            self._last_purge = now
            await self._db.execute("DELETE FROM processed WHERE expires_at < ?", (now,))
        # On the clock that ages conversations; get_conversation ignores expired ones already, this frees their rows
        # (an indexed range delete, at most once a minute, never a scan per message).
        aged = self._clock()
        if aged - self._last_conversation_purge >= _PURGE_EVERY_S:
            self._last_conversation_purge = aged
            await self._db.execute("DELETE FROM conversations WHERE updated_at < ?", (aged - self._conversation_ttl,))
            await self._db.execute("DELETE FROM user_tokens WHERE day < ?", (int(aged // _DAY_S),))

    def _check_writable(self) -> None:
        if time.monotonic() < self._unwritable_until:
            raise StoreUnavailable("SQLite refused a write a moment ago (locked or full); not waiting on it yet")

    def _write_failed(self, exc: BaseException) -> None:
        # OperationalError is the file (locked, full, I/O), not the statement: spare the next callers the wait.
        if isinstance(exc, sqlite3.OperationalError):
            self._unwritable_until = time.monotonic() + _UNWRITABLE_PAUSE_S
            # SQLite's own words ("database is locked", "database or disk is full") tell the operator which it is.
            _log.error("store_unwritable", error=str(exc), pause_seconds=_UNWRITABLE_PAUSE_S)

    async def _delete_owed(self) -> None:
        """Close the journal entries whose deletion failed earlier (called with the lock held)."""
        sids = sorted(self._owed_deletes)
        for start in range(0, len(sids), _KEYS_PER_QUERY):
            chunk = sids[start : start + _KEYS_PER_QUERY]
            await self._db.execute(f"DELETE FROM pending WHERE sid IN ({','.join('?' * len(chunk))})", chunk)
            self._owed_deletes.difference_update(chunk)

    def _owe_delete(self, sid: str) -> None:
        self._owed_deletes.add(sid)
        if self._retry_owed_task is None or self._retry_owed_task.done():
            self._retry_owed_task = asyncio.create_task(self._retry_owed(), name="sqlite owed deletes")

    async def _retry_owed(self) -> None:
        while self._owed_deletes:
            await asyncio.sleep(_RETRY_OWED_S)
            with contextlib.suppress(Exception):
                await self._write(None)

    @counted("accept")
    async def accept(self, reply: OwedReply, idempotency_token: str | None = None) -> bool:
        # Group commit: every accept queued while the connection is busy goes into the next transaction. A burst
        # of webhooks then costs a handful of transactions instead of one each, each a series of hops to the
        # connection's thread (one at a time kept the last of a burst waiting seconds: docs/reliability.md).
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._accepts.append((reply, idempotency_token, waiter))
        async with self._lock:
            if not waiter.done():
                await self._accept_queued(waiter)
        try:
            return waiter.result()
        finally:
            # A failed batch raises here too, and this frame lives on in the exception's traceback: still holding
            # the future that holds the exception would make a reference cycle, left for the garbage collector.
            del waiter

    async def _accept_queued(self, waiter: asyncio.Future[bool]) -> None:
        """One transaction for every accept queued so far. A failure is raised to the caller that ran the batch
        (`waiter`'s) and set on the futures of the others."""
        batch, self._accepts = self._accepts, []
        try:
            self._check_writable()
            await self._delete_owed()
            # Without the futures: a loop variable of _accept_batch left on one would be the same cycle, for a
            # statement failing after the loop (COMMIT on a full disk).
            results = await self._accept_batch([(reply, token) for reply, token, _ in batch])
        except BaseException as exc:
            self._write_failed(exc)
            _fail_waiters([other for _, _, other in batch if other is not waiter], exc)
            # As in accept: the futures now hold the exception that is about to carry this frame in its traceback.
            del batch
            raise
        for (_, _, each), result in zip(batch, results, strict=True):
            each.set_result(result)

    async def _accept_batch(self, batch: list[tuple[OwedReply, str | None]]) -> list[bool]:
        now = time.time()
        await self._purge_expired(now)
        keys_of = [[f"sid:{reply.sid}"] + ([f"tok:{token}"] if token else []) for reply, token in batch]
        all_keys = sorted({key for keys in keys_of for key in keys})
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            seen: set[str] = set()
            for start in range(0, len(all_keys), _KEYS_PER_QUERY):
                chunk = all_keys[start : start + _KEYS_PER_QUERY]
                marks = ",".join("?" * len(chunk))
                rows = await self._db.execute_fetchall(
                    f"SELECT key FROM processed WHERE key IN ({marks}) AND expires_at >= ?", (*chunk, now)
                )
                seen.update(row[0] for row in rows)
            results, processed, pending = [], [], []
            for (reply, _), keys in zip(batch, keys_of, strict=True):
                new = not any(key in seen for key in keys)  # also catches a repeat within this batch
                results.append(new)
                if new:
                    seen.update(keys)
                    processed += [(key, now + self._ttl) for key in keys]
                    pending.append(
                        (
                            reply.sid,
                            reply.to,
                            reply.user_key,
                            reply.prompt,
                            reply.arrived_at,
                            reply.traceparent,
                            media_to_json(reply.media) or None,
                        )
                    )
            if processed:
                await self._db.executemany(
                    "INSERT OR REPLACE INTO processed (key, expires_at) VALUES (?, ?)", processed
                )
                await self._db.executemany(
                    "INSERT OR REPLACE INTO pending (sid, to_addr, user_key, prompt, arrived_at, traceparent, media) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    pending,
                )
            await self._db.execute("COMMIT")
        except BaseException as exc:
            # After SQLITE_FULL or an I/O error SQLite has rolled back already: a second ROLLBACK would fail with
            # "no transaction is active" and hide why. A cancelled statement may still be running: roll back after it.
            if not isinstance(exc, sqlite3.Error) or self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute("ROLLBACK")
            raise
        return results

    async def _write(self, sql: str | None, params: tuple[object, ...] = ()) -> None:
        """One write statement (None: only the owed journal deletes), failing at once while the file is unwritable."""
        async with self._lock:
            self._check_writable()
            try:
                await self._delete_owed()
                if sql is not None:
                    await self._db.execute(sql, params)
            except BaseException as exc:
                self._write_failed(exc)
                raise

    @counted("drop")
    async def drop(self, sid: str) -> None:
        try:
            await self._write("DELETE FROM pending WHERE sid = ?", (sid,))
        except Exception:
            self._owe_delete(sid)
            raise

    @counted("save_answer")
    async def save_answer(self, sid: str, parts: list[str], kind: str) -> None:
        await self._write("UPDATE pending SET answer_parts = ?, kind = ? WHERE sid = ?", (json.dumps(parts), kind, sid))

    @counted("mark_sent")
    async def mark_sent(self, sid: str, parts_sent: int) -> None:
        await self._write("UPDATE pending SET parts_sent = ? WHERE sid = ?", (parts_sent, sid))

    async def _owed(self) -> list[OwedReply]:
        async with self._db.execute(
            "SELECT sid, to_addr, user_key, prompt, arrived_at, answer_parts, kind, parts_sent, traceparent, media "
            "FROM pending ORDER BY arrived_at"
        ) as cur:
            rows = await cur.fetchall()
        return [
            OwedReply(
                sid=row[0],
                to=row[1],
                user_key=row[2],
                prompt=row[3],
                arrived_at=row[4],
                answer_parts=json.loads(row[5]) if row[5] else None,
                kind=row[6],
                parts_sent=row[7],
                traceparent=row[8],
                media=media_from_json(row[9]),
            )
            for row in rows
        ]

    @counted("count_message")
    async def count_message(self, user_key: str, window_s: int) -> int:
        # In the file, not in memory: worker processes share the file, and each must see the others' counts.
        # Counts queued while the connection is busy go into one statement, as accepts do.
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._counts.append((user_key, int(self._clock() // window_s), waiter))
        async with self._lock:
            if not waiter.done():
                await self._count_queued(waiter)
        try:
            return waiter.result()
        finally:
            del waiter  # as in accept: no cycle through the exception's traceback

    async def _count_queued(self, waiter: asyncio.Future[int]) -> None:
        """One transaction for every count queued so far; a failure is raised here and set on the others."""
        batch, self._counts = self._counts, []
        try:
            self._check_writable()
            totals = await self._add_counts([(user_key, window) for user_key, window, _ in batch])
        except BaseException as exc:
            self._write_failed(exc)
            _fail_waiters([other for _, _, other in batch if other is not waiter], exc)
            del batch
            raise
        # Each message gets its own place in the count: the last of a user's in this batch gets the total.
        for user_key, _, each in reversed(batch):
            each.set_result(totals[user_key])
            totals[user_key] -= 1
        del batch

    async def _add_counts(self, batch: list[tuple[str, int]]) -> dict[str, int]:
        added: dict[str, tuple[int, int]] = {}
        for user_key, window in batch:
            added[user_key] = (window, added.get(user_key, (window, 0))[1] + 1)
        rows = [(user_key, window, n) for user_key, (window, n) in added.items()]
        totals: dict[str, int] = {}
        # One row per user; a row of an earlier window starts over. Upserts in one write transaction, so two
        # processes counting at once both land in the total.
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            for start in range(0, len(rows), _KEYS_PER_QUERY // 3):
                chunk = rows[start : start + _KEYS_PER_QUERY // 3]
                async with self._db.execute(
                    f"INSERT INTO rate_counts (user_key, window, count) VALUES {','.join(['(?, ?, ?)'] * len(chunk))} "
                    "ON CONFLICT(user_key) DO UPDATE SET count = CASE WHEN window = excluded.window "
                    "THEN count + excluded.count WHEN window > excluded.window THEN count ELSE excluded.count END, "
                    "window = MAX(window, excluded.window) RETURNING user_key, count",
                    [value for row in chunk for value in row],
                ) as cur:
                    totals.update({row[0]: row[1] for row in await cur.fetchall()})
            await self._db.execute("COMMIT")
        except BaseException as exc:
            if not isinstance(exc, sqlite3.Error) or self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute("ROLLBACK")
            raise
        return totals

    def _today(self) -> int:
        return int(self._clock() // _DAY_S)

    @counted("tokens_today")
    async def tokens_today(self, user_key: str) -> int:
        # Read on every message before its run: reads queued while the connection is busy go into one statement,
        # as counts do (one statement each cost a burst of 200 about three times as long).
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._token_reads.append((user_key, waiter))
        async with self._lock:
            if not waiter.done():
                await self._read_tokens_queued(waiter)
        try:
            return waiter.result()
        finally:
            del waiter  # as in accept: no cycle through the exception's traceback

    async def _read_tokens_queued(self, waiter: asyncio.Future[int]) -> None:
        """One query for every read queued so far; a failure is raised here and set on the others."""
        batch, self._token_reads = self._token_reads, []
        try:
            users = sorted({user_key for user_key, _ in batch})
            found: dict[str, int] = {}
            for start in range(0, len(users), _KEYS_PER_QUERY):
                chunk = users[start : start + _KEYS_PER_QUERY]
                marks = ",".join("?" * len(chunk))
                async with self._db.execute(
                    f"SELECT user_key, tokens FROM user_tokens WHERE day = ? AND user_key IN ({marks})",
                    (self._today(), *chunk),
                ) as cur:
                    found.update({row[0]: int(row[1]) for row in await cur.fetchall()})
        except BaseException as exc:
            _fail_waiters([other for _, other in batch if other is not waiter], exc)
            del batch
            raise
        for user_key, each in batch:
            each.set_result(found.get(user_key, 0))
        del batch

    @counted("add_tokens")
    async def add_tokens(self, user_key: str, tokens: int) -> None:
        # One row per user; a row of an earlier day starts over (and its notice with it), as rate_counts does.
        await self._write(
            "INSERT INTO user_tokens (user_key, day, tokens) VALUES (?, ?, ?) ON CONFLICT(user_key) DO UPDATE SET "
            "tokens = CASE WHEN day = excluded.day THEN tokens + excluded.tokens WHEN day > excluded.day THEN tokens "
            "ELSE excluded.tokens END, noticed = CASE WHEN day >= excluded.day THEN noticed ELSE 0 END, "
            "day = MAX(day, excluded.day)",
            (user_key, self._today(), tokens),
        )

    @counted("claim_budget_notice")
    async def claim_budget_notice(self, user_key: str) -> bool:
        async with self._lock:
            self._check_writable()
            try:
                # One statement: of two workers refusing the same user at once, only one changes the row.
                async with self._db.execute(
                    "UPDATE user_tokens SET noticed = 1 WHERE user_key = ? AND day = ? AND noticed = 0",
                    (user_key, self._today()),
                ) as cur:
                    return cur.rowcount == 1
            except BaseException as exc:
                self._write_failed(exc)
                raise

    @counted("get_conversation")
    async def get_conversation(self, user_key: str) -> str | None:
        # One trip to the connection's thread, not three (execute, fetchone, close): each is a thread hop.
        rows = await self._db.execute_fetchall(
            "SELECT response_id FROM conversations WHERE user_key = ? AND updated_at > ?",
            (user_key, self._clock() - self._conversation_ttl),
        )
        # An older row is a conversation that went silent for WABOT_CONVERSATION_TTL: the next message starts afresh.
        row = next(iter(rows), None)
        return row[0] if row is not None else None

    @counted("set_conversation")
    async def set_conversation(self, user_key: str, response_id: str | None) -> None:
        await self._write(
            "INSERT INTO conversations (user_key, response_id, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT(user_key) DO UPDATE SET response_id = excluded.response_id, "
            "updated_at = excluded.updated_at",
            (user_key, response_id, self._clock()),
        )

    @counted("claim_orphans")
    async def claim_orphans(self) -> list[OwedReply]:
        # Only the first call of a process can find orphans: later entries belong to this process's own runs.
        # An advisory lock next to the database, held for the life of the process, makes exactly one of several
        # workers on one file the one that resumes the journal.
        if self._recovery_claimed or not self._take_recovery_lock():
            return []
        self._recovery_claimed = True
        return await self._owed()

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
        if self._retry_owed_task is not None:
            self._retry_owed_task.cancel()
        with contextlib.suppress(Exception):
            await self._write(None)  # a last try for journal entries still to close
        await self._db.close()
        if self._recovery_lock is not None:
            os.close(self._recovery_lock)
            self._recovery_lock = None
