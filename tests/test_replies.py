"""The promise: every message gets an answer, inline within the deadline or as a follow-up after a holding reply."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable

import pytest

from bot.settings import DEFAULT_APOLOGY_MESSAGE, DEFAULT_HOLDING_MESSAGE
from tests.conftest import Bot, LogLines, metric


def test_fast_answer_goes_back_inline_as_twiml(bot: Bot, sim, sink) -> None:
    posted = bot.send("Hello there")
    assert posted.status == 200
    assert posted.headers["content-type"].startswith("application/xml")
    assert posted.messages == ["[turn 1] Hello there"]
    assert len(sim.calls()) == 1
    bot.wait_idle()
    assert sink.messages() == []


@pytest.mark.slow
def test_seed_case_with_the_real_8s_default(make_bot: Callable[..., Bot], sim, sink) -> None:
    """The production failure: a 23 s model run. Holding reply inside 8.5 s, the answer through REST at ~23 s."""
    bot = make_bot(reply_timeout=8.0, followup_timeout=120.0)
    started = time.monotonic()
    posted = bot.send("We raised 250K from Elon Musk", sender="+15550002222")
    assert posted.status == 200
    assert 8.0 <= posted.elapsed < 8.5
    assert posted.messages == [DEFAULT_HOLDING_MESSAGE]
    assert "try again" not in posted.messages[0].lower()
    [followup] = sink.wait_for_messages(1, to="whatsapp:+15550002222", timeout=30)
    assert followup["body"] == "[turn 1] We raised 250K from Elon Musk"
    assert followup["from"] == "whatsapp:+14155238886"
    assert 22.5 < followup["at"] - started < 26.0


def test_slow_answer_gets_holding_reply_then_followup(bot: Bot, sim, sink) -> None:
    before = metric("wabot_followups_total", {"outcome": "delivered"})
    posted = bot.send("complex question [sim:delay=2]", sender="+15550003333")
    assert 1.0 <= posted.elapsed < 1.5
    assert posted.messages == [DEFAULT_HOLDING_MESSAGE]
    [followup] = sink.wait_for_messages(1, to="whatsapp:+15550003333", timeout=10)
    assert followup["body"] == "[turn 1] complex question"
    assert followup["status_callback"] == f"{bot.url}/whatsapp/status"
    bot.wait_idle()
    assert metric("wabot_followups_total", {"outcome": "delivered"}) == before + 1
    assert len(sim.calls()) == 1


@pytest.mark.parametrize(
    "users",
    [5, pytest.param(200, marks=pytest.mark.exclusive)],  # 200 at once measure the deadline on every core
)
def test_simultaneous_users_all_answered_inside_the_deadline(
    make_bot: Callable[..., Bot], sim, sink, log_lines: LogLines, users: int
) -> None:
    bot = make_bot(reply_timeout=1.0)
    mark = log_lines.mark()
    slow = {i for i in range(users) if i % 4 == 0}

    def one(i: int) -> tuple[int, float, list[str]]:
        text = f"user {i} asks [sim:delay={1.6 if i in slow else 0.1}]"
        posted = bot.send(text, sender=f"+1555100{i:04d}")
        return posted.status, posted.elapsed, posted.messages

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(users, 64)) as pool:
        results = list(pool.map(one, range(users)))
    assert all(status == 200 for status, _, _ in results)
    # The deadline is 1 s from a request's arrival in the app; the bot's own total time (arrival to reply sent) says
    # when each reply left. Here the bot shares its process, and so the GIL, with the simulator, the sink and 64
    # client threads: its loop waits for the GIL behind them, up to about 1 s more on this 2-core machine on a good
    # day, 1.1-2.2 s more on 2026-12-05 (200 users: the slowest 2.08-3.16 s, for the code of a week before, which
    # had passed under 2 s, and that day's alike). The deadline's precision with the bot in a process of its own is
    # tests/test_load.py's and `make bench`'s; here every slow user must still get the holding reply (below), which
    # a reply that waited for its 1.6 s model answer would not be.
    totals = [e["total_time"] for e in log_lines.events(mark) if e["event"] == "total_time"]
    assert len(totals) == users
    assert max(totals) < 3.5, sorted(totals)[-5:]
    assert max(elapsed for _, elapsed, _ in results) < 4.5  # seen from the client threads, queueing included
    holding = [i for i, (_, _, msgs) in enumerate(results) if msgs == [DEFAULT_HOLDING_MESSAGE]]
    assert set(holding) >= slow
    for i, (_, _, msgs) in enumerate(results):
        if i not in holding:
            assert msgs == [f"[turn 1] user {i} asks"]
    followups = sink.wait_for_messages(len(holding), timeout=30)
    assert sorted(m["to"] for m in followups) == sorted(f"whatsapp:+1555100{i:04d}" for i in holding)
    bot.wait_idle()
    assert len(sim.calls()) == users


def test_conversation_context_is_kept_per_user(bot: Bot, sim) -> None:
    assert bot.send("My name is Ada", sender="+15550004444").messages == ["[turn 1] My name is Ada"]
    assert bot.send("Hello again", sender="+15550004444").messages == ["[turn 2] Hello again"]
    assert bot.send("What was my first message?", sender="+15550004444").messages == [
        "Your first message was: My name is Ada"
    ]
    # Another user starts their own conversation.
    assert bot.send("Hi", sender="+15550005555").messages == ["[turn 1] Hi"]
    calls = sim.calls()
    assert calls[0]["previous_response_id"] is None
    assert calls[1]["previous_response_id"] == calls[0]["id"]
    assert calls[3]["previous_response_id"] is None
    assert all(call["instructions"] for call in calls)


def test_similar_messages_are_treated_alike(bot: Bot, sim) -> None:
    answers = [bot.send(text, sender=f"+1555000{i}999").messages for i, text in enumerate(["hi", "Hi", "hi!"])]
    assert answers == [["[turn 1] hi"], ["[turn 1] Hi"], ["[turn 1] hi!"]]
    assert [call["tools"] for call in sim.calls()] == [["get_current_time", "calculate"]] * 3


def test_tool_call_round_trip(bot: Bot, sim) -> None:
    posted = bot.send('what is 6*7 [sim:tool=calculate:{"expression": "6*7"}]')
    assert posted.messages == ['Tool calculate said: {"expression": "6*7", "result": 42}']
    assert metric("wabot_tool_calls_total", {"tool": "calculate", "outcome": "ok"}) >= 1


def test_one_users_messages_are_answered_in_order_without_delaying_others(
    make_bot: Callable[..., Bot], sim, sink
) -> None:
    bot = make_bot(reply_timeout=0.5)
    user, other = "+15550006666", "+15550007777"
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        first = pool.submit(bot.send, "first [sim:delay=1.5]", sender=user)
        sim.wait_for_calls(1, timeout=5)  # the second message must arrive after the first: that is what is tested
        second = pool.submit(bot.send, "second", sender=user)
        third_other = pool.submit(bot.send, "not waiting", sender=other)
        assert third_other.result().messages == ["[turn 1] not waiting"]
        assert third_other.result().elapsed < 0.5
        assert first.result().messages == [DEFAULT_HOLDING_MESSAGE]
        assert second.result().messages == [DEFAULT_HOLDING_MESSAGE]
    answers = sink.wait_for_messages(2, to=f"whatsapp:{user}", timeout=10)
    assert [m["body"] for m in answers] == ["[turn 1] first", "[turn 2] second"]


def test_long_answers_are_split_inline_and_in_followups(bot: Bot, sim, sink) -> None:
    posted = bot.send("tell me everything [sim:long=4000]")
    assert len(posted.messages) == 3
    assert all(len(part) <= 1600 for part in posted.messages)
    assert sum(len(part) for part in posted.messages) >= 4000 - 3
    assert " ".join(posted.messages).startswith("Sentence 1 of the long answer.")

    sim_text = sim.calls()[-1]
    assert sim_text["outcome"] == "ok"
    bot.send("and later [sim:long=3300] [sim:delay=1.3]", sender="+15550008888")
    parts = sink.wait_for_messages(3, to="whatsapp:+15550008888", timeout=10)
    assert [len(p["body"]) <= 1600 for p in parts] == [True, True, True]
    assert " ".join(p["body"] for p in parts).startswith("Sentence 1 of the long answer.")


@pytest.mark.parametrize(
    ("directive", "model_outcome"),
    [
        ("[sim:error=429]", "rate_limited"),
        ("[sim:error=500]", "server_error"),
        ("[sim:reset]", "connection_error"),
    ],
)
def test_model_errors_end_in_a_polite_reply(
    make_bot: Callable[..., Bot], sim, directive: str, model_outcome: str
) -> None:
    # 429 carries Retry-After: 1, which the SDK honours twice: give the retries room inside the deadline.
    bot = make_bot(reply_timeout=4.0)
    before = metric("wabot_model_calls_total", {"outcome": model_outcome})
    errors_before = metric("wabot_ai_runs_total", {"outcome": "error"})
    posted = bot.send(f"hello {directive}")
    assert posted.status == 200
    assert posted.messages == [DEFAULT_APOLOGY_MESSAGE]
    assert metric("wabot_model_calls_total", {"outcome": model_outcome}) == before + 1
    assert metric("wabot_ai_runs_total", {"outcome": "error"}) == errors_before + 1
    # The SDK retried (max_retries=2) before giving up.
    assert len(sim.calls()) == 3


def test_transient_model_error_is_retried_and_answered(bot: Bot, sim) -> None:
    assert bot.send("hello [sim:flaky=500:1]").messages == ["[turn 1] hello"]
    assert [call["status"] for call in sim.calls()] == [500, 200]


def test_hanging_model_gets_holding_reply_then_apology(make_bot: Callable[..., Bot], sim, sink) -> None:
    bot = make_bot(reply_timeout=0.5, followup_timeout=2.0)
    before = metric("wabot_ai_errors_total", {"phase": "followup", "error_type": "timeout"})
    posted = bot.send("hello [sim:hang]", sender="+15550009999")
    assert posted.messages == [DEFAULT_HOLDING_MESSAGE]
    [apology] = sink.wait_for_messages(1, to="whatsapp:+15550009999", timeout=10)
    assert apology["body"] == DEFAULT_APOLOGY_MESSAGE
    assert metric("wabot_ai_errors_total", {"phase": "followup", "error_type": "timeout"}) == before + 1


def test_endless_tool_loop_and_empty_answer_end_in_apology(bot: Bot, sim) -> None:
    assert bot.send("loop [sim:toolloop]").messages == [DEFAULT_APOLOGY_MESSAGE]
    assert len(sim.calls()) == bot.settings.max_tool_rounds + 1
    assert bot.send("nothing [sim:empty]").messages == [DEFAULT_APOLOGY_MESSAGE]


def test_twilio_rest_failures_are_retried_then_delivered_once(bot: Bot, sim, sink) -> None:
    sink.inject(status=500, count=2)
    bot.send("slow [sim:delay=1.2]", sender="+15550001212")
    [delivered] = sink.wait_for_messages(1, to="whatsapp:+15550001212", timeout=15)
    assert delivered["body"] == "[turn 1] slow"
    bot.wait_idle()
    assert [a["status"] for a in sink.attempts()] == [500, 500, 201]
    assert len(sink.messages()) == 1


def test_outside_24h_window_is_recorded_as_failed_followup(bot: Bot, sim, sink, log_lines) -> None:
    mark = log_lines.mark()
    before = metric("wabot_followups_total", {"outcome": "failed"})
    sink.inject(status=400, code=63016, count=1)
    bot.send("late [sim:delay=1.2]", sender="+15550001313")
    bot.wait_idle(timeout=15)
    assert metric("wabot_followups_total", {"outcome": "failed"}) == before + 1
    [failed] = [e for e in log_lines.events(mark) if e["event"] == "followup_failed"]
    assert failed["twilio_code"] == 63016
    assert failed["error_type"] == "rejected"
    assert len(sink.attempts()) == 1  # a 4xx is final: no retries


def test_complex_message_with_tools_under_time_pressure(bot: Bot, sim, sink) -> None:
    """A tool-using run that outlives the deadline: holding reply, then the tool-backed answer as a follow-up."""
    posted = bot.send(
        'How much is 7% of 250K? [sim:tool=calculate:{"expression": "250000*0.07"}] [sim:delay=0.6]',
        sender="+15550001414",
    )
    assert posted.messages == [DEFAULT_HOLDING_MESSAGE]  # two model calls of 0.6 s each pass the 1 s deadline
    [followup] = sink.wait_for_messages(1, to="whatsapp:+15550001414", timeout=10)
    assert followup["body"] == 'Tool calculate said: {"expression": "250000*0.07", "result": 17500.0}'
    assert [call["outcome"] for call in sim.calls()] == ["ok", "ok"]
