"""Per-user ordering: one user's messages are answered one after another, in arrival order.

Each message takes a ticket when it is accepted (synchronously, so tickets follow arrival order) and waits for
the previous ticket of the same user to finish. Different users never wait for each other.
"""

from __future__ import annotations

import asyncio


class Ticket:
    """A place in one user's line."""

    def __init__(self, lanes: UserLanes, key: str, previous: asyncio.Future[None] | None) -> None:
        self._lanes = lanes
        self._key = key
        self._previous = previous
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def wait_turn(self) -> None:
        """Return once every earlier message of this user is answered."""
        if self._previous is not None and not self._previous.done():
            # asyncio.wait, not await: being cancelled here must not cancel the previous message's turn.
            await asyncio.wait({self._previous})

    def release(self) -> None:
        """Let the next message of this user go."""
        if not self.done.done():
            self.done.set_result(None)
        self._lanes._forget(self._key, self.done)


class UserLanes:
    """In-process lines, one per user key; empty lines are forgotten so memory follows active users."""

    def __init__(self) -> None:
        self._tails: dict[str, asyncio.Future[None]] = {}

    def take_ticket(self, key: str) -> Ticket:
        ticket = Ticket(self, key, self._tails.get(key))
        self._tails[key] = ticket.done
        return ticket

    def _forget(self, key: str, done: asyncio.Future[None]) -> None:
        if self._tails.get(key) is done:
            del self._tails[key]

    def active_users(self) -> int:
        return len(self._tails)
