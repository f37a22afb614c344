"""Per-user ordering: one user's messages are answered one after another, in arrival order.

Each message takes a ticket when it is accepted and waits for the previous ticket of the same user to be
released. Different users never wait for each other. `UserLanes` keeps the lines in this process (enough for one
process on SQLite); the Redis store provides lines shared by every replica (`bot/store/redis.py`).
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class InLine(Protocol):
    """What a line needs to know of an accepted message: whose it is, and the number a shared line drew for it
    (0 when none was drawn). The store's journal record has both."""

    @property
    def user_key(self) -> str: ...

    @property
    def ticket(self) -> int: ...


class Ticket(Protocol):
    async def wait_turn(self, timeout: float) -> bool:
        """Return once every earlier message of this user is answered (True), or after `timeout` s (False)."""
        ...

    async def release(self) -> None:
        """Let the next message of this user go."""
        ...


class Lanes(Protocol):
    async def ticket_for(self, reply: InLine) -> Ticket:
        """The place of an accepted message in its user's line."""
        ...


class LocalTicket:
    """A place in one user's in-process line."""

    def __init__(self, lanes: UserLanes, key: str, previous: asyncio.Future[None] | None) -> None:
        self._lanes = lanes
        self._key = key
        self._previous = previous
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def wait_turn(self, timeout: float) -> bool:
        if self._previous is None or self._previous.done():
            return True
        # asyncio.wait, not await: being cancelled here must not cancel the previous message's turn.
        done, _ = await asyncio.wait({self._previous}, timeout=timeout)
        return bool(done)

    async def release(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        self._lanes.forget(self._key, self.done)


class UserLanes:
    """In-process lines, one per user key; empty lines are forgotten so memory follows active users."""

    def __init__(self) -> None:
        self._tails: dict[str, asyncio.Future[None]] = {}

    async def ticket_for(self, reply: InLine) -> LocalTicket:
        # No await before the tail is replaced: tickets follow the order in which messages got here.
        key = reply.user_key
        ticket = LocalTicket(self, key, self._tails.get(key))
        self._tails[key] = ticket.done
        return ticket

    def forget(self, key: str, done: asyncio.Future[None]) -> None:
        if self._tails.get(key) is done:
            del self._tails[key]
