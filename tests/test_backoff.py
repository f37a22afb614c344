"""The backoff rule and Retry-After parsing that both of Twilio's retry loops use (bot/backoff.py), without a
network: the schedule's bounds, growth and cap, and what a server's Retry-After can and cannot make it do."""

from __future__ import annotations

import email.utils

from hypothesis import given
from hypothesis import strategies as st

from bot.backoff import Backoff, parse_retry_after
from bot.followup import ROUND_BACKOFF
from bot.outbound import CALL_BACKOFF

NOW = 1_800_000_000.0
rules = st.builds(
    Backoff,
    base_s=st.floats(0.001, 10.0),
    cap_s=st.floats(0.001, 600.0),
    retry_after_cap_s=st.none() | st.floats(0.0, 3600.0),
)
failures = st.integers(1, 5000)
retry_afters = st.none() | st.floats(0.0, 1e6)


def test_the_two_loops_schedules() -> None:
    """The numbers the bot runs with: a call's attempts 0.5, 1, 2, 4, 8, 8 s; a follow-up's rounds 2 s up to 60 s."""
    assert [CALL_BACKOFF.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert [ROUND_BACKOFF.delay(n) for n in range(1, 8)] == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    # Twilio's Retry-After: honoured when longer than the backoff, up to 30 s; never shortens the wait.
    assert CALL_BACKOFF.delay(1, retry_after=1.5) == 1.5
    assert CALL_BACKOFF.delay(4, retry_after=1.5) == 4.0
    assert CALL_BACKOFF.delay(1, retry_after=3600) == 30.0


@given(rules, failures, retry_afters)
def test_a_delay_is_within_its_bounds(rule: Backoff, n: int, retry_after: float | None) -> None:
    delay = rule.delay(n, retry_after)
    exponential = min(rule.base_s * 2 ** min(n - 1, 60), rule.cap_s)
    ceiling = max(rule.cap_s, rule.retry_after_cap_s or 0.0)
    assert min(rule.base_s, rule.cap_s) <= delay <= ceiling
    assert delay >= exponential  # a Retry-After never makes the wait shorter


@given(rules, failures)
def test_delays_grow_until_the_cap_and_stay_there(rule: Backoff, n: int) -> None:
    assert rule.delay(n) <= rule.delay(n + 1)
    if rule.delay(n) < rule.cap_s:
        assert rule.delay(n + 1) == min(2 * rule.delay(n), rule.cap_s)
    assert rule.delay(n + 200) == rule.cap_s


@given(rules, failures, st.floats(0.0, 1e6))
def test_retry_after_is_honoured_up_to_its_limit(rule: Backoff, n: int, retry_after: float) -> None:
    limit = rule.cap_s if rule.retry_after_cap_s is None else rule.retry_after_cap_s
    delay = rule.delay(n, retry_after)
    if retry_after <= limit:
        assert delay >= retry_after
    assert delay == max(rule.delay(n), min(retry_after, limit))


@given(st.floats(0.0, 1e9, allow_nan=False))
def test_retry_after_in_seconds(seconds: float) -> None:
    assert parse_retry_after(repr(seconds)) == seconds
    assert parse_retry_after(str(int(seconds))) == int(seconds)


@given(st.integers(-86_400, 86_400))
def test_retry_after_as_an_http_date(offset: int) -> None:
    header = email.utils.formatdate(NOW + offset, usegmt=True)
    assert parse_retry_after(header, now=NOW) == max(offset, 0)


def test_retry_after_absent_negative_or_unreadable() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("-5") == 0.0
    for junk in ("soon", "nan", "inf", "Fri, 32 Foo 2026 99:00:00 GMT"):
        assert parse_retry_after(junk) is None, junk


@given(st.text(max_size=40))
def test_any_header_value_parses_to_none_or_a_delay(value: str) -> None:
    seconds = parse_retry_after(value, now=NOW)
    assert seconds is None or 0.0 <= seconds < float("inf")
