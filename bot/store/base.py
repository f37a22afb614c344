"""The store interface and the journal record of a reply that is owed to a user."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class PendingReply:
    """A message we accepted and still owe an answer to.

    Written when the message is accepted, removed once its answer went back inline or was delivered as a
    follow-up, so whatever is left after a crash is exactly what is still owed.
    """

    sid: str
    to: str
    user_key: str
    prompt: str
    arrived_at: float
    answer_parts: list[str] | None = None
    kind: str | None = None
    parts_sent: int = 0
    traceparent: str | None = None
    owner: str = ""
    extra: dict[str, str] = field(default_factory=dict)


class Store(Protocol):
    """What the bot needs from its storage backend."""

    async def accept(self, reply: PendingReply, idempotency_token: str | None = None) -> bool:
        """Record a new inbound message and journal the reply it is owed; False when it was seen before."""
        ...

    async def drop(self, sid: str) -> None:
        """Forget the journal entry of a message whose answer went back inline."""
        ...

    async def save_answer(self, sid: str, parts: list[str], kind: str) -> None:
        """Keep the finished answer (or apology) so a restart delivers it without a new model run."""
        ...

    async def mark_sent(self, sid: str, parts_sent: int) -> None:
        """Remember how many parts of a follow-up Twilio has accepted."""
        ...

    async def finish(self, sid: str) -> None:
        """The follow-up was delivered (or given up): nothing more is owed."""
        ...

    async def pending(self) -> list[PendingReply]:
        """Every reply still owed, oldest first."""
        ...

    async def get_conversation(self, user_key: str) -> str | None:
        """The last response id of a user's conversation, for `previous_response_id`."""
        ...

    async def set_conversation(self, user_key: str, response_id: str | None) -> None:
        """Store (or with None, reset) a user's conversation state."""
        ...

    async def claim_recovery(self) -> bool:
        """True for the one process that should resume owed replies (several workers share one store)."""
        ...

    async def ping(self) -> None:
        """Raise when the store cannot be reached."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
