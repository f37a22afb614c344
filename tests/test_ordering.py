"""Per-user lines in one process (bot/ordering.py), without a bot around it.

One user's messages go one after another in arrival order; other users never wait. The end-to-end tests show
this with a slow model; these drive the lines directly, with no clock: a ticket's turn comes when the one before
it is released, and only then.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from bot.ordering import UserLanes

FOREVER = 60.0  # a bound no passing test comes near: turns here come by release, not by time


@dataclass(frozen=True)
class Message:
    """What the lines read of an accepted message: its user's key."""

    user_key: str


async def settle() -> None:
    """Let every task that can run, run (a few loop passes; nothing here waits on time)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_users_first_message_goes_at_once() -> None:
    lanes = UserLanes()
    ticket = await lanes.ticket_for(Message("alice"))
    assert await ticket.wait_turn(0) is True


async def test_the_next_message_waits_for_the_one_before_to_be_released() -> None:
    lanes = UserLanes()
    first = await lanes.ticket_for(Message("alice"))
    second = await lanes.ticket_for(Message("alice"))
    waiting = asyncio.create_task(second.wait_turn(FOREVER))
    await settle()
    assert not waiting.done()
    await first.release()
    assert await asyncio.wait_for(waiting, 5) is True


async def test_another_user_never_waits_for_a_busy_one() -> None:
    lanes = UserLanes()
    busy = [await lanes.ticket_for(Message("alice")) for _ in range(3)]
    bob = await lanes.ticket_for(Message("bob"))
    assert await bob.wait_turn(0) is True
    assert await busy[0].wait_turn(0) is True
    assert await busy[1].wait_turn(0) is False


async def test_a_turn_not_come_within_the_timeout_is_reported() -> None:
    lanes = UserLanes()
    await lanes.ticket_for(Message("alice"))  # never released
    late = await lanes.ticket_for(Message("alice"))
    assert await late.wait_turn(0.01) is False


async def test_a_cancelled_waiter_leaves_the_message_before_it_untouched() -> None:
    lanes = UserLanes()
    first = await lanes.ticket_for(Message("alice"))
    second = await lanes.ticket_for(Message("alice"))
    waiting = asyncio.create_task(second.wait_turn(FOREVER))
    await settle()
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert not first.done.cancelled()
    await first.release()
    assert first.done.done()
    await second.release()
    third = await lanes.ticket_for(Message("alice"))
    assert await third.wait_turn(0) is True


async def test_release_twice_is_harmless_and_a_released_line_starts_fresh() -> None:
    lanes = UserLanes()
    first = await lanes.ticket_for(Message("alice"))
    await first.release()
    await first.release()
    again = await lanes.ticket_for(Message("alice"))
    assert await again.wait_turn(0) is True


async def _run(arrivals: list[str], seed: int) -> dict[str, list[int]]:
    """Every message takes its ticket in arrival order; each then waits for its turn, does a random amount of
    work (loop passes) and releases. Returns the order in which each user's messages held their turn."""
    lanes = UserLanes()
    tickets = [await lanes.ticket_for(Message(user)) for user in arrivals]
    rng = random.Random(seed)
    served: dict[str, list[int]] = {user: [] for user in arrivals}
    holding: set[str] = set()

    async def handle(number: int) -> None:
        user, ticket = arrivals[number], tickets[number]
        for _ in range(rng.randrange(3)):
            await asyncio.sleep(0)
        assert await ticket.wait_turn(FOREVER)
        assert user not in holding, f"two of {user}'s messages held their turn at once"
        holding.add(user)
        served[user].append(number)
        for _ in range(rng.randrange(4)):
            await asyncio.sleep(0)
        holding.discard(user)
        await ticket.release()

    # Started in a shuffled order: the lines, not the order tasks happen to run in, must give the order.
    order = list(range(len(arrivals)))
    rng.shuffle(order)
    await asyncio.wait_for(asyncio.gather(*(handle(n) for n in order)), 10)
    return served


@given(st.lists(st.sampled_from(["alice", "bob", "carol", "dan"]), max_size=25), st.integers(0, 2**32))
def test_each_users_messages_hold_their_turn_one_at_a_time_in_arrival_order(arrivals: list[str], seed: int) -> None:
    served = asyncio.run(_run(arrivals, seed))
    for user, numbers in served.items():
        assert numbers == [n for n, u in enumerate(arrivals) if u == user]


@given(st.lists(st.sampled_from(["alice", "bob", "carol"]), min_size=1, max_size=20))
def test_a_message_whose_user_has_nothing_before_it_goes_at_once(arrivals: list[str]) -> None:
    """However busy other users are, the first message of a user (while none of theirs is open) never waits."""

    async def scenario() -> None:
        lanes = UserLanes()
        seen: set[str] = set()
        for user in arrivals:
            ticket = await lanes.ticket_for(Message(user))
            assert await ticket.wait_turn(0) is (user not in seen)
            seen.add(user)

    asyncio.run(scenario())
