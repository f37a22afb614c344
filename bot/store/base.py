"""The store interface and the journal record of a reply that is owed to a user."""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar

from structlog.typing import FilteringBoundLogger

from bot.inbound import Media
from bot.ordering import Lanes
from telemetry import metrics


class StoreUnavailable(Exception):
    """The store failed a moment ago and is not tried again yet, so callers do not queue up behind its waits."""


@dataclass
class OwedReply:
    """The journal record of a reply owed: a message we accepted and still owe an answer to.

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
    ticket: int = 0
    # The message's attachments (URL and content type, never their bytes): a resumed run downloads them again.
    media: tuple[Media, ...] = ()


def media_to_json(media: tuple[Media, ...]) -> str:
    """The journal's form of a message's attachments ('' when it has none)."""
    return json.dumps([{"url": m.url, "content_type": m.content_type} for m in media]) if media else ""


def media_from_json(text: str | None) -> tuple[Media, ...]:
    return tuple(Media(url=m["url"], content_type=m["content_type"]) for m in json.loads(text)) if text else ()


class Store(Protocol):
    """What the bot needs from its storage backend."""

    async def accept(self, reply: OwedReply, idempotency_token: str | None = None) -> bool:
        """Record a new inbound message and journal the reply it is owed; False when it was seen before."""
        ...

    async def drop(self, sid: str) -> None:
        """Close a journal entry: the answer went back inline, or its follow-up was delivered or given up."""
        ...

    async def save_answer(self, sid: str, parts: list[str], kind: str) -> None:
        """Keep the finished answer (or apology) so a restart delivers it without a new model run."""
        ...

    async def mark_sent(self, sid: str, parts_sent: int) -> None:
        """Remember how many parts of a follow-up Twilio has accepted."""
        ...

    async def count_message(self, user_key: str, window_s: int) -> int:
        """Count a message of this user in the current fixed window of `window_s` seconds; return the count."""
        ...

    async def tokens_today(self, user_key: str) -> int:
        """The model tokens this user used today (UTC day on the store's clock), over every replica and worker."""
        ...

    async def add_tokens(self, user_key: str, tokens: int) -> None:
        """Add a run's model tokens to this user's count of today; the count ends with the day."""
        ...

    async def claim_budget_notice(self, user_key: str) -> bool:
        """True exactly once per user and day (over every replica and worker): this refusal sends the notice."""
        ...

    async def get_conversation(self, user_key: str) -> str | None:
        """The last response id of a user's conversation, for `previous_response_id`."""
        ...

    async def set_conversation(self, user_key: str, response_id: str | None) -> None:
        """Store (or with None, reset) a user's conversation state."""
        ...

    async def claim_orphans(self) -> list[OwedReply]:
        """Owed replies no live process is working on, now owned by this one (resume them)."""
        ...

    def lanes(self) -> Lanes:
        """The per-user lines that keep one user's messages in order."""
        ...

    async def ping(self) -> None:
        """Raise when the store cannot be reached."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


T = TypeVar("T")
P = ParamSpec("P")


def counted(op: str) -> Callable[[Callable[P, Coroutine[Any, Any, T]]], Callable[P, Coroutine[Any, Any, T]]]:
    """Count the failures of a store operation in `wabot_store_errors_total{op}` (and let them propagate)."""
    if op not in metrics.STORE_OPS:
        raise ValueError(f"{op!r} is not in telemetry.metrics.STORE_OPS")

    def wrap(func: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        @functools.wraps(func)
        async def run(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return await func(*args, **kwargs)
            except Exception:
                metrics.STORE_ERRORS.labels(op=op).inc()
                raise

        return run

    return wrap


async def guarded(operation: Awaitable[T], log: FilteringBoundLogger, op: str, message_sid: str) -> T | None:
    """Run a store operation whose failure must not cost the user their answer: log it and go on.

    Used for bookkeeping on the reply path (journal progress, conversation state). A lost write there means at
    worst a repeated message after a crash or a conversation that starts afresh; a raised error would mean
    no answer at all.
    """
    try:
        return await operation
    except Exception as exc:
        log.error("store_error", op=op, message_sid=message_sid, error_type=exc.__class__.__name__)
        return None
