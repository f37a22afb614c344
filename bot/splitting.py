"""Splitting long answers into Twilio-sized messages at sentence or word boundaries, dropping nothing unless an
answer needs more messages than it may take (`split_capped`: each message is a paid WhatsApp message)."""

from __future__ import annotations

import re

TWILIO_MAX_CHARS = 1600
# Ends the last message of an answer that was cut, so the user knows there was more.
SHORTENED_MARKER = "\n\n… (answer shortened: it was too long for WhatsApp)"
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+|\n+")


def split_message(text: str, limit: int = TWILIO_MAX_CHARS) -> list[str]:
    """Split `text` into parts of at most `limit` characters.

    Prefers paragraph and sentence ends, then spaces; only a single "word" longer than the limit is cut
    mid-word. Joining the parts with single spaces gives back the text up to whitespace at the cuts.
    """
    text = text.strip()
    if len(text) <= limit:
        return [text] if text else []
    parts: list[str] = []
    rest = text
    while len(rest) > limit:
        window = rest[: limit + 1]
        cut = _last_boundary(window, limit)
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        parts.append(rest)
    return parts


def split_capped(
    text: str, max_parts: int, limit: int = TWILIO_MAX_CHARS, marker: str = SHORTENED_MARKER
) -> tuple[list[str], int]:
    """`split_message`, but at most `max_parts` parts: past that the last part kept is cut again at a boundary, to
    leave room for `marker`, and the rest is dropped. Returns the parts and how many the whole text would take."""
    parts = split_message(text, limit)
    if len(parts) <= max_parts:
        return parts, len(parts)
    last = split_message(parts[max_parts - 1], limit - len(marker))[0]
    return [*parts[: max_parts - 1], last + marker], len(parts)


def _last_boundary(window: str, limit: int) -> int:
    # A cut in the first third would make many tiny parts; fall back to a word, then a hard cut.
    floor = limit // 3
    sentence_cuts = [m.end() for m in _SENTENCE_END.finditer(window) if floor <= m.start() <= limit]
    if sentence_cuts:
        return min(sentence_cuts[-1], limit)
    space = window.rfind(" ", floor, limit + 1)
    if space > 0:
        return space + 1
    return limit
