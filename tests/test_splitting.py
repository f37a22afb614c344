"""Splitting long answers into Twilio-sized parts (bot/splitting.py), without a bot around it.

The end-to-end tests see a few long answers split; these check the rules on any text: no part over the limit,
nothing lost or reordered (only whitespace at a cut goes), and cuts at sentence ends, then spaces, before a word
is ever cut.
"""

from __future__ import annotations

import re

from hypothesis import example, given
from hypothesis import strategies as st

from bot.splitting import SHORTENED_MARKER, TWILIO_MAX_CHARS, split_capped, split_message

SMALL_LIMIT = 40  # small enough that Hypothesis' texts are split many times over


def rebuilds(text: str, parts: list[str]) -> bool:
    """True when `text` (stripped) is exactly the parts in order, with only whitespace (or nothing) between them."""
    rest = text.strip()
    for part in parts:
        if not rest.startswith(part):
            return False
        rest = rest[len(part) :].lstrip()
    return rest == ""


words = st.text(alphabet="abcdefghijklmnopqrstuvwxyzé0123456789,'", min_size=1, max_size=SMALL_LIMIT // 3 - 1)
separators = st.sampled_from([" ", "  ", ". ", "! ", "? ", "… ", ".\n", "\n\n", "\n"])


@st.composite
def prose(draw: st.DrawFn) -> str:
    """Words (each shorter than a third of the limit) joined by spaces, sentence ends and line breaks."""
    items = draw(st.lists(st.tuples(words, separators), max_size=60))
    return "".join(word + sep for word, sep in items)


@given(st.text(max_size=5 * SMALL_LIMIT))
@example("x" * (3 * SMALL_LIMIT + 1))
@example(" \n\t ")
def test_no_part_is_over_the_limit_or_empty_and_nothing_but_whitespace_at_cuts_is_lost(text: str) -> None:
    parts = split_message(text, SMALL_LIMIT)
    assert all(0 < len(part) <= SMALL_LIMIT for part in parts)
    assert all(part == part.strip() for part in parts)
    assert rebuilds(text, parts), parts


@given(st.text(max_size=4 * TWILIO_MAX_CHARS))
def test_at_twilios_limit_too(text: str) -> None:
    parts = split_message(text)
    assert all(0 < len(part) <= TWILIO_MAX_CHARS for part in parts)
    assert rebuilds(text, parts)


@given(st.text(max_size=8 * SMALL_LIMIT), st.integers(min_value=1, max_value=5))
@example("x" * (3 * SMALL_LIMIT + 1), 1)
def test_capped_answers_keep_at_most_max_parts_and_end_a_cut_one_with_the_marker(text: str, max_parts: int) -> None:
    marker = " [cut]"
    whole = split_message(text, SMALL_LIMIT)
    parts, needed = split_capped(text, max_parts, SMALL_LIMIT, marker)
    assert needed == len(whole)
    assert all(0 < len(part) <= SMALL_LIMIT for part in parts)
    if len(whole) <= max_parts:
        assert parts == whole
        return
    assert len(parts) == max_parts
    assert parts[:-1] == whole[: max_parts - 1]
    assert parts[-1].endswith(marker)
    kept = parts[-1].removesuffix(marker)
    assert kept and whole[max_parts - 1].startswith(kept)  # a boundary cut of the part it replaces


def test_the_marker_fits_in_twilios_limit_with_room_for_text() -> None:
    parts, needed = split_capped("word " * 2000, 2)
    assert (len(parts), needed) == (2, 7)
    assert parts[1].endswith(SHORTENED_MARKER) and len(parts[1]) <= TWILIO_MAX_CHARS
    assert len(parts[1]) > TWILIO_MAX_CHARS - len(SHORTENED_MARKER) - 10


@given(prose())
def test_words_shorter_than_the_limit_are_never_cut(text: str) -> None:
    parts = split_message(text, SMALL_LIMIT)
    assert [w for part in parts for w in part.split()] == text.split()
    assert rebuilds(text, parts)


@given(prose())
def test_a_sentence_end_in_the_window_is_where_the_cut_goes(text: str) -> None:
    """When the text to split has a sentence end (or line break) past the first third of the limit, the part
    ends there: at the last such end within the limit."""
    parts = split_message(text, SMALL_LIMIT)
    rest = text.strip()
    for part in parts[:-1]:
        window = rest[: SMALL_LIMIT + 1]
        ends = [
            m.start()
            for m in re.finditer(r"(?<=[.!?…])\s+|\n+", window)
            if SMALL_LIMIT // 3 <= m.start() <= SMALL_LIMIT
        ]
        if ends:
            assert len(part) == len(window[: ends[-1]].rstrip()), (window, part)
        rest = rest[len(part) :].lstrip()


def test_short_text_is_one_part_and_blank_text_none() -> None:
    assert split_message("  hello there \n") == ["hello there"]
    assert split_message("x" * TWILIO_MAX_CHARS) == ["x" * TWILIO_MAX_CHARS]
    assert split_message("") == []
    assert split_message(" \n ") == []


def test_a_word_longer_than_the_limit_is_cut_hard_and_kept_whole_in_order() -> None:
    word = "".join(chr(ord("a") + i % 26) for i in range(4000))
    assert split_message(word) == [word[:1600], word[1600:3200], word[3200:]]


def test_the_sentence_end_beats_a_later_space() -> None:
    first = "A" * 1000 + "."
    text = first + " " + "word " * 400
    parts = split_message(text)
    assert parts[0] == first
    assert all(len(part) <= TWILIO_MAX_CHARS for part in parts)


def test_a_sentence_end_in_the_first_third_is_passed_over_for_a_later_space() -> None:
    """Cutting right after a short opening sentence would make a tiny first message."""
    text = "Hi. " + "word " * 500
    first = split_message(text)[0]
    assert first.startswith("Hi. word")
    assert len(first) > TWILIO_MAX_CHARS // 3
    assert first.endswith("word")


def test_a_paragraph_break_is_a_cut_even_without_punctuation() -> None:
    text = "x " * 400 + "\n\n" + "y " * 500
    parts = split_message(text)
    assert parts[0] == ("x " * 400).strip()
    assert parts[1].startswith("y y")
