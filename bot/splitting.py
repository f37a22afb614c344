"""Splitting long answers into Twilio-sized messages at sentence or word boundaries, dropping nothing."""

from __future__ import annotations

import re

TWILIO_MAX_CHARS = 1600
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
