"""Abuse and overload: the per-user rate limit and the global cap on concurrent model runs.

Over the rate limit a user gets one polite notice and the model is not called. With every model slot taken a
new message gets the busy holding reply at once, and its answer still arrives as a follow-up.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable

from bot.settings import DEFAULT_BUSY_MESSAGE, DEFAULT_HOLDING_MESSAGE, DEFAULT_RATE_LIMIT_MESSAGE
from tests.clock import DrivenClock
from tests.conftest import Bot, LogLines, metric
from tests.waiting import wait_until

LIMIT = 3


def test_over_the_rate_limit_one_notice_then_silence_and_no_model_call(
    make_bot: Callable[..., Bot], sim, log_lines: LogLines
) -> None:
    # The limit counts per wall-clock minute: a driven clock keeps the burst inside one window.
    bot = make_bot(user_rate_limit=LIMIT, clock=DrivenClock())
    flooder, other = "+15550101010", "+15550202020"
    before = metric("wabot_webhook_rejections_total", {"reason": "rate_limited"})
    mark = log_lines.mark()

    answered = [bot.send(f"message {i}", sender=flooder) for i in range(LIMIT)]
    notice = bot.send("one too many", sender=flooder)
    silenced = [bot.send(f"still flooding {i}", sender=flooder) for i in range(3)]
    neighbour = bot.send("hello", sender=other)

    assert [p.messages for p in answered] == [[f"[turn {i + 1}] message {i}"] for i in range(LIMIT)]
    assert (notice.status, notice.messages) == (200, [DEFAULT_RATE_LIMIT_MESSAGE])
    # 200 with an empty <Response/>: Twilio must not retry, and the user is not told again.
    assert [(p.status, p.messages) for p in silenced] == [(200, [])] * 3
    assert neighbour.messages == ["[turn 1] hello"]
    assert [c["text"] for c in sim.calls()] == [f"message {i}" for i in range(LIMIT)] + ["hello"]
    assert metric("wabot_webhook_rejections_total", {"reason": "rate_limited"}) == before + 4

    limited = [e for e in log_lines.events(mark) if e.get("reason") == "rate_limited"]
    assert [e["notice"] for e in limited] == [True, False, False, False]
    assert {(e["event"], e["limit"], e["level"]) for e in limited} == {("webhook_rejected", LIMIT, "warning")}
    assert [e["count"] for e in limited] == [LIMIT + 1, LIMIT + 2, LIMIT + 3, LIMIT + 4]
    assert all("0101010" not in line for line in log_lines.lines[mark:])  # the number is hashed


def test_the_limit_counts_per_minute_window_and_a_new_window_starts_afresh(make_bot: Callable[..., Bot], sim) -> None:
    clock = DrivenClock(start=1_800_000_000.0)  # the first second of a minute
    bot = make_bot(user_rate_limit=1, clock=clock)
    user = "+15550111111"
    assert bot.send("first", sender=user).messages == ["[turn 1] first"]
    clock.advance(59.9)  # still the same minute
    assert bot.send("same minute", sender=user).messages == [DEFAULT_RATE_LIMIT_MESSAGE]
    clock.advance(0.1)  # the next minute: counted afresh, and over the limit again gets a notice again
    assert bot.send("next minute", sender=user).messages == ["[turn 2] next minute"]
    assert bot.send("again", sender=user).messages == [DEFAULT_RATE_LIMIT_MESSAGE]
    assert bot.send("and again", sender=user).messages == []
    assert [c["text"] for c in sim.calls()] == ["first", "next minute"]


def test_rate_limited_messages_are_not_journaled(make_bot: Callable[..., Bot], sim, tmp_path) -> None:
    import sqlite3

    store = tmp_path / "limited.db"
    bot = make_bot(user_rate_limit=1, store=f"sqlite:///{store}", clock=DrivenClock())
    bot.send("first", sender="+15550303030")
    over = bot.send("second", sender="+15550303030")
    assert over.messages == [DEFAULT_RATE_LIMIT_MESSAGE]
    bot.wait_idle()
    with sqlite3.connect(store) as db:
        # Neither journaled nor marked processed: a flood costs no writes.
        assert db.execute("SELECT COUNT(*) FROM pending").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM processed").fetchone()[0] == 1


def test_limit_zero_turns_the_rate_limit_off(make_bot: Callable[..., Bot], sim) -> None:
    bot = make_bot(user_rate_limit=0)
    replies = [bot.send(f"m{i}", sender="+15550404040").messages for i in range(25)]
    assert replies == [[f"[turn {i + 1}] m{i}"] for i in range(25)]


def test_full_model_slots_give_the_busy_reply_at_once_and_the_answer_follows(
    make_bot: Callable[..., Bot], sim, sink, log_lines: LogLines
) -> None:
    bot = make_bot(max_concurrent_runs=2, reply_timeout=1.0)
    busy_before = metric("wabot_ai_runs_total", {"outcome": "busy"})
    mark = log_lines.mark()
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        running = [pool.submit(bot.send, f"slow {i} [sim:delay=2.5]", sender=f"+1555050000{i}") for i in range(2)]
        sim.wait_for_calls(2, timeout=5)  # both slots are taken by runs now talking to the model
        assert metric("wabot_runs_active") == 2
        waiting = bot.send("waiting [sim:delay=0.2]", sender="+15550500009")
        # The webhook answered at once; the run it started queues for a slot in its own task, a moment later.
        wait_until(lambda: metric("wabot_runs_queued") == 1, 2.0, "the third run to queue for a model slot")
        assert [f.result().messages for f in running] == [[DEFAULT_HOLDING_MESSAGE]] * 2

    # No deadline race for a run that cannot start: the busy reply comes at once, not after the 1 s deadline.
    assert waiting.messages == [DEFAULT_BUSY_MESSAGE]
    assert waiting.elapsed < 0.5
    assert "try again" not in DEFAULT_BUSY_MESSAGE.lower()
    [late] = sink.wait_for_messages(1, to="whatsapp:+15550500009", timeout=10)
    assert late["body"] == "[turn 1] waiting"
    for i in range(2):
        [answer] = sink.wait_for_messages(1, to=f"whatsapp:+1555050000{i}", timeout=10)
        assert answer["body"] == f"[turn 1] slow {i}"
    bot.wait_idle()

    # The queued run called the model only once a slot was free, after both slow calls.
    calls = sim.calls()
    assert len(calls) == 3
    assert calls[2]["text"].startswith("waiting")
    assert metric("wabot_ai_runs_total", {"outcome": "busy"}) == busy_before + 1
    assert (metric("wabot_runs_active"), metric("wabot_runs_queued")) == (0, 0)
    assert metric("wabot_max_concurrent_runs") == 2
    [event] = [e for e in log_lines.events(mark) if e["event"] == "runs_at_capacity"]
    assert (event["level"], event["max_concurrent_runs"]) == ("warning", 2)
    totals = [e for e in log_lines.events(mark) if e["event"] == "total_time" and e["outcome"] == "busy"]
    assert len(totals) == 1
    assert len(sink.messages()) == 3  # each user exactly one follow-up
