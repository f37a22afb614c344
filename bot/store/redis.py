"""Redis store: several bot replicas share dedupe, conversations, per-user order and the owed-reply journal.

- Dedupe: `SET NX EX` on the MessageSid (and idempotency token) inside one Lua script with the journal write,
  so of two replicas given the same message exactly one accepts it.
- Ownership: every replica holds a lease key with an expiry (`PX`) and refreshes it; each journal entry names
  its owner. When a replica dies its lease expires and any other replica claims its entries (a Lua
  compare-and-set on the owner) and resumes them. A replica that stops gracefully deletes its lease at once.
- Order: the accept script also draws the message's ticket from a per-user counter (`INCR`) and journals it.
  A message's turn has come once the user's "served" number reaches the ticket before it; it waits for that
  with `BLPOP` on a per-ticket list its predecessor pushes to, so waiting costs no polling and crosses replicas.
  A reply resumed by another replica keeps its ticket, so the user's later messages still wait for it.
- Outages: a command fails after one quick reconnect, not after redis-py's default ten tries. A message waiting
  for its turn when Redis goes away goes ahead (answering out of order beats not answering). Journal entries that
  could not be closed and turns that could not be handed on are written again as soon as Redis answers, so a
  restart resends nothing and the user's next message does not wait for a turn the outage swallowed. After an
  outage that made every lease lapse, a replica takes nothing over until one lease has passed since its own last
  failed renewal: by then every live replica has renewed, so only the dead ones' replies change hands.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from bot.ordering import InLine
from bot.store.base import OwedReply, counted, media_from_json, media_to_json
from telemetry import metrics
from telemetry.logging import get_logger

_PREFIX = "wabot"
_LINE_TTL_S = 24 * 3600
_DAY_S = 86_400
# How often writes that failed during an outage are tried again.
_RETRY_OWED_S = 0.5
_COMMAND_CONNECTIONS = 100
_POOL_WAIT_S = 5.0  # as long as a command's own socket timeout
_TURN_CONNECTIONS = 2000
_log = get_logger("wabot")


class _OwedWrites:
    """Writes that must not be lost to an outage (closing a journal entry, handing on a turn), made again until
    Redis takes them. Each is keyed, so owing the same write twice makes it once."""

    def __init__(self) -> None:
        self._writes: dict[tuple[str, ...], Callable[[], Awaitable[Any]]] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, key: tuple[str, ...], write: Callable[[], Awaitable[Any]]) -> None:
        self._writes[key] = write
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._retry(), name="redis owed writes")

    def __len__(self) -> int:
        return len(self._writes)

    async def pay(self) -> None:
        """Make every owed write, in the order owed; stop at the first failure (Redis still away)."""
        for key, write in list(self._writes.items()):
            await write()
            self._writes.pop(key, None)

    async def _retry(self) -> None:
        while self._writes:
            await asyncio.sleep(_RETRY_OWED_S)
            with contextlib.suppress(Exception):
                await self.pay()

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


# KEYS: seen keys..., pending hash, pending index, line counter, line served.
# ARGV: dedupe ttl, score, owner, line ttl, then hash field/value pairs. Returns 0 (seen before) or the ticket.
_ACCEPT = """
local n_seen = #KEYS - 4
for i = 1, n_seen do
  if redis.call('EXISTS', KEYS[i]) == 1 then return 0 end
end
for i = 1, n_seen do
  redis.call('SET', KEYS[i], '1', 'EX', ARGV[1])
end
local ticket = redis.call('INCR', KEYS[n_seen + 3])
redis.call('EXPIRE', KEYS[n_seen + 3], ARGV[4])
if ticket == 1 then redis.call('DEL', KEYS[n_seen + 4]) end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[n_seen + 1], 'owner', ARGV[3], 'ticket', ticket, unpack(fields))
redis.call('ZADD', KEYS[n_seen + 2], ARGV[2], KEYS[n_seen + 1])
return ticket
"""

# KEYS: line served, go list of the next ticket; ARGV: ticket, line ttl.
_RELEASE = """
local served = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > served then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end
redis.call('RPUSH', KEYS[2], '1')
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""

# KEYS: pending hash; ARGV: expected owner, new owner, lease key prefix. Claims only if the owner's lease is gone.
_CLAIM = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return 0 end
if owner ~= ARGV[1] then return 0 end
if redis.call('EXISTS', ARGV[3] .. owner) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[2])
return 1
"""


class RedisStore:
    """The Store interface on Redis, for several replicas."""

    def __init__(
        self,
        client: aioredis.Redis,
        blocking: aioredis.Redis,
        dedupe_ttl_s: float,
        lease_s: float,
        clock: Callable[[], float] = time.time,
        conversation_ttl_s: float = 24 * 3600,
    ) -> None:
        self._clock = clock
        self._conversation_ttl = conversation_ttl_s
        self._token_reads: list[tuple[str, asyncio.Future[int]]] = []
        self._read_task: asyncio.Task[None] | None = None
        self._lease_s = lease_s
        # Looking twice per lease bounds a dead replica's replies to about 1.5 leases without an owner.
        self.takeover_interval_s = lease_s / 2
        self._redis = client
        self._blocking = blocking
        self._ttl = int(dedupe_ttl_s)
        self.replica_id = uuid.uuid4().hex[:12]
        self._accept = client.register_script(_ACCEPT)
        self._claim = client.register_script(_CLAIM)
        self._owed = _OwedWrites()
        self._lanes = RedisLanes(client, blocking, self._owed)
        self._heartbeat: asyncio.Task[None] | None = None
        self._renewal_failed_at = -math.inf

    @classmethod
    async def open(
        cls,
        url: str,
        dedupe_ttl_s: float,
        lease_s: float,
        *,
        clock: Callable[[], float] = time.time,
        conversation_ttl_s: float = 24 * 3600,
    ) -> RedisStore:
        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_connect_timeout": 5.0,
            "health_check_interval": 15,
            # One quick reconnect (after a Redis restart every pooled connection is dead), then fail: redis-py's
            # default of ten tries with backoff kept each command of a webhook waiting seconds during an outage.
            "retry": Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
        }
        # BLPOP blocks for as long as a user's previous message takes: it gets its own connections with no socket
        # timeout, so a long wait is not mistaken for a dead server (and does not starve the other commands).
        # Blocking pools: past `max_connections`, a command waits for a free connection instead of failing (the
        # default pool raises MaxConnectionsError, and a burst of webhooks can take every one: docs/reliability.md).
        # Commands take well under a millisecond, so a bounded wait is short; the BLPOP pool holds a connection per
        # message waiting for its turn, so it is larger and its callers' own timeouts bound the wait.
        commands = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=_COMMAND_CONNECTIONS, timeout=_POOL_WAIT_S, socket_timeout=5.0, **options
        )
        turns = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=_TURN_CONNECTIONS, timeout=None, socket_timeout=None, **options
        )
        store = cls(
            aioredis.Redis.from_pool(commands),
            aioredis.Redis.from_pool(turns),
            dedupe_ttl_s,
            lease_s,
            clock,
            conversation_ttl_s,
        )
        await store._renew_lease()
        store._heartbeat = asyncio.create_task(store._keep_lease(), name="redis lease")
        return store

    def _lease_key(self, replica: str) -> str:
        return f"{_PREFIX}:replica:{replica}"

    async def _renew_lease(self) -> None:
        await self._redis.set(self._lease_key(self.replica_id), str(time.time()), px=int(self._lease_s * 1000))

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            # A missed renewal (Redis restarting) is retried on the next beat; two misses in a row and the lease
            # lapses, which is the point: another replica may then take over.
            try:
                await counted("renew_lease")(self._renew_lease)()
            except Exception:
                self._renewal_failed_at = time.monotonic()

    @counted("accept")
    async def accept(self, reply: OwedReply, idempotency_token: str | None = None) -> bool:
        seen = [f"{_PREFIX}:seen:{reply.sid}"] + (
            [f"{_PREFIX}:seen-token:{idempotency_token}"] if idempotency_token else []
        )
        fields = {
            "sid": reply.sid,
            "to": reply.to,
            "user_key": reply.user_key,
            "prompt": reply.prompt,
            "arrived_at": repr(reply.arrived_at),
            "parts_sent": "0",
            "traceparent": reply.traceparent or "",
            "media": media_to_json(reply.media),
        }
        flat = [item for pair in fields.items() for item in pair]
        line = f"{_PREFIX}:line:{reply.user_key}"
        keys = [*seen, self._pending_key(reply.sid), f"{_PREFIX}:pending", f"{line}:next", f"{line}:served"]
        ticket = await self._accept(keys=keys, args=[self._ttl, reply.arrived_at, self.replica_id, _LINE_TTL_S, *flat])
        reply.ticket = int(ticket)
        return reply.ticket > 0

    def _pending_key(self, sid: str) -> str:
        return f"{_PREFIX}:pending:{sid}"

    async def _delete(self, sid: str) -> None:
        key = self._pending_key(sid)
        async with self._redis.pipeline(transaction=True) as pipe:
            # A pipeline's commands queue and return the pipeline; only `execute` talks to Redis.
            pipe.delete(key)
            pipe.zrem(f"{_PREFIX}:pending", key)
            await pipe.execute()

    @counted("drop")
    async def drop(self, sid: str) -> None:
        try:
            await self._delete(sid)
        except Exception:
            # Left in the journal, the entry would be resumed (and its answer sent again) after a restart.
            self._owed.add(("drop", sid), lambda: self._delete(sid))
            raise

    @counted("save_answer")
    async def save_answer(self, sid: str, parts: list[str], kind: str) -> None:
        await self._redis.hset(self._pending_key(sid), mapping={"answer_parts": json.dumps(parts), "kind": kind})

    @counted("mark_sent")
    async def mark_sent(self, sid: str, parts_sent: int) -> None:
        await self._redis.hset(self._pending_key(sid), "parts_sent", str(parts_sent))

    @counted("claim_orphans")
    async def claim_orphans(self) -> list[OwedReply]:
        if time.monotonic() - self._renewal_failed_at < self._lease_s:
            # Redis was just away: the other replicas' leases lapsed too, and they may not have renewed yet.
            # Taking their replies now would answer them twice.
            return []
        claimed = []
        # decode_responses=True: every reply is text (redis-py types them as bytes or text).
        for key in cast(list[str], await self._redis.zrange(f"{_PREFIX}:pending", 0, -1)):
            owner = cast(str | None, await self._redis.hget(key, "owner"))
            if owner is None or owner == self.replica_id:
                continue
            if await self._claim(keys=[key], args=[owner, self.replica_id, f"{_PREFIX}:replica:"]):
                entry = cast(dict[str, str], await self._redis.hgetall(key))
                if entry:
                    claimed.append(_to_reply(entry))
        return claimed

    def lanes(self) -> RedisLanes:
        return self._lanes

    @counted("count_message")
    async def count_message(self, user_key: str, window_s: int) -> int:
        key = f"{_PREFIX}:rate:{user_key}:{int(self._clock() // window_s)}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, window_s * 2)
            count, _ = await pipe.execute()
        return int(count)

    def _tokens_key(self, kind: str, user_key: str) -> str:
        # Keyed by the UTC day on the store's clock; the key outlives its day by one, then Redis drops it.
        return f"{_PREFIX}:{kind}:{user_key}:{int(self._clock() // _DAY_S)}"

    @counted("tokens_today")
    async def tokens_today(self, user_key: str) -> int:
        # Read on every message before its run: the reads of one turn of the event loop go out as one MGET, so a
        # burst of webhooks does not take a pool connection each for it.
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._token_reads.append((self._tokens_key("tokens", user_key), waiter))
        if len(self._token_reads) == 1:
            self._read_task = asyncio.create_task(self._read_tokens(), name="redis token reads")
        try:
            return await waiter
        finally:
            del waiter  # no cycle through a failure's traceback

    async def _read_tokens(self) -> None:
        batch, self._token_reads = self._token_reads, []
        try:
            values = await self._redis.mget([key for key, _ in batch])
        except Exception as exc:
            for _, each in batch:
                if not each.done():
                    each.set_exception(exc)
            del batch
            return
        for (_, each), value in zip(batch, values, strict=True):
            if not each.done():
                each.set_result(int(value) if value is not None else 0)

    @counted("add_tokens")
    async def add_tokens(self, user_key: str, tokens: int) -> None:
        key = self._tokens_key("tokens", user_key)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(key, tokens)
            pipe.expire(key, 2 * _DAY_S)
            await pipe.execute()

    @counted("claim_budget_notice")
    async def claim_budget_notice(self, user_key: str) -> bool:
        return bool(await self._redis.set(self._tokens_key("budget_notice", user_key), "1", nx=True, ex=2 * _DAY_S))

    @counted("get_conversation")
    async def get_conversation(self, user_key: str) -> str | None:
        value = cast(str | None, await self._redis.get(f"{_PREFIX}:conversation:{user_key}"))
        if value is None:
            return None
        # "<written at> <response id>"; a bare id was written before conversations expired and carries no age.
        written, _, response_id = value.rpartition(" ")
        if written and self._clock() - float(written) >= self._conversation_ttl:
            return None  # silent for WABOT_CONVERSATION_TTL: the key's own expiry is about to remove it
        return response_id

    @counted("set_conversation")
    async def set_conversation(self, user_key: str, response_id: str | None) -> None:
        key = f"{_PREFIX}:conversation:{user_key}"
        if response_id is None:
            await self._redis.delete(key)
        else:
            # Every answer sets the key again, so its expiry counts the silence since the last one. The time written
            # with it says the same on the bot's clock, which tests drive.
            await self._redis.set(key, f"{self._clock()!r} {response_id}", ex=max(1, math.ceil(self._conversation_ttl)))

    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self._owed.cancel()
        with contextlib.suppress(Exception):
            await self._owed.pay()  # a last try before the lease goes and others may take over what is left
        # A graceful stop hands this replica's owed replies to the others right away.
        with contextlib.suppress(Exception):
            await self._redis.delete(self._lease_key(self.replica_id))
        await self._redis.aclose()
        await self._blocking.aclose()


def _to_reply(entry: dict[str, str]) -> OwedReply:
    return OwedReply(
        sid=entry["sid"],
        to=entry["to"],
        user_key=entry["user_key"],
        prompt=entry["prompt"],
        arrived_at=float(entry["arrived_at"]),
        answer_parts=json.loads(entry["answer_parts"]) if entry.get("answer_parts") else None,
        kind=entry.get("kind") or None,
        parts_sent=int(entry.get("parts_sent", "0")),
        traceparent=entry.get("traceparent") or None,
        owner=entry.get("owner", ""),
        ticket=int(entry.get("ticket", "0")),
        media=media_from_json(entry.get("media")),
    )


class RedisTicket:
    """A place in a user's line shared by every replica. Ticket 0 (accepted while Redis was down) waits for nothing."""

    def __init__(self, lanes: RedisLanes, key: str, number: int) -> None:
        self._lanes = lanes
        self._line = f"{_PREFIX}:line:{key}"
        self._number = number

    async def wait_turn(self, timeout: float) -> bool:
        if self._number <= 1:
            return True
        try:
            return await self._wait_turn(timeout)
        except (RedisError, OSError) as exc:
            # Redis went away while this message waited: answering out of order beats not answering at all.
            metrics.STORE_ERRORS.labels(op="wait_turn").inc()
            _log.error("store_error", op="wait_turn", error_type=exc.__class__.__name__)
            return True

    async def _wait_turn(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        # Two looks at most: "served" answers at once when the turn already came (also for a resumed reply whose
        # "go" its first owner consumed); otherwise BLPOP sleeps until the predecessor pushes it.
        for _ in range(2):
            served = await self._lanes.redis.get(f"{self._line}:served")
            if int(served or 0) >= self._number - 1:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            # A BLPOP timeout of 0 means forever, hence the floor.
            await self._lanes.blocking.blpop([f"{self._line}:go:{self._number}"], timeout=max(remaining, 0.01))
        return False

    @counted("release_turn")
    async def release(self) -> None:
        if self._number > 0:
            keys = [f"{self._line}:served", f"{self._line}:go:{self._number + 1}"]
            args = [self._number, _LINE_TTL_S]
            try:
                await self._lanes.release(keys=keys, args=args)
            except Exception:
                # Lost, the turn would hold the user's next message back until its wait timed out (minutes).
                self._lanes.owed.add(("release", *keys), lambda: self._lanes.release(keys=keys, args=args))
                raise


class RedisLanes:
    """Per-user lines on Redis; the ticket itself was drawn by the accept script."""

    def __init__(self, client: aioredis.Redis, blocking: aioredis.Redis, owed: _OwedWrites) -> None:
        self.redis = client
        self.blocking = blocking
        self.owed = owed
        self.release = client.register_script(_RELEASE)

    async def ticket_for(self, reply: InLine) -> RedisTicket:
        return RedisTicket(self, reply.user_key, reply.ticket)
