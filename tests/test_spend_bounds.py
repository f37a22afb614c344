"""Spend bounds, through the real webhook with the OpenAI simulator and the Twilio sink: every model call is capped
(`max_output_tokens`) and may drop old turns (`truncation: "auto"`), a conversation silent for WABOT_CONVERSATION_TTL
starts afresh on either store, and an answer takes at most WABOT_MAX_REPLY_PARTS messages, inline or followed up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from bot.settings import DEFAULT_HOLDING_MESSAGE
from bot.splitting import SHORTENED_MARKER, TWILIO_MAX_CHARS
from tests.clock import DrivenClock
from tests.conftest import Bot, LogLines, metric
from tests.redis_server import RedisServer

PARTS = "wabot_reply_parts_total"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


def test_every_model_call_carries_the_output_cap_and_auto_truncation(make_bot: Callable[..., Bot], sim) -> None:
    bot = make_bot(max_output_tokens=64)
    assert bot.send("hello").messages == ["[turn 1] hello"]
    # A tool round trip makes a second call in the same run: it is capped too.
    bot.send('sum [sim:tool=calculate:{"expression": "6*7"}]', sender="+15550003333")
    calls = sim.calls()
    assert len(calls) == 3, [c["text"] for c in calls]
    assert [(c["request"]["max_output_tokens"], c["request"]["truncation"]) for c in calls] == [(64, "auto")] * 3


def test_an_answer_cut_by_the_output_cap_is_still_sent(make_bot: Callable[..., Bot], sim, log_lines: LogLines) -> None:
    bot = make_bot(max_output_tokens=20)
    mark = log_lines.mark()
    posted = bot.send("tell me everything [sim:long=2000]")
    # The simulator, like the API, stops at the cap and says so; the bot answers with the text it has.
    stored = sim.response(sim.calls()[-1]["id"])
    assert stored is not None
    assert (stored["status"], stored["incomplete_details"]) == ("incomplete", {"reason": "max_output_tokens"})
    assert len(posted.messages) == 1
    assert posted.messages[0].startswith("Sentence 1 of the long answer.")
    assert len(posted.messages[0].split()) == 20
    incomplete = [e for e in log_lines.events(mark) if e["event"] == "answer_incomplete"]
    assert [(e["reason"], e["level"]) for e in incomplete] == [("max_output_tokens", "warning")]


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_conversation_silent_past_its_ttl_starts_afresh(
    make_bot: Callable[..., Bot], sim, request: pytest.FixtureRequest, backend: str
) -> None:
    store = None
    if backend == "redis":
        store = request.getfixturevalue("redis_server")
        import redis

        with redis.Redis.from_url(store) as client:
            client.flushall()
    clock = DrivenClock()
    bot = make_bot(store=store, clock=clock, conversation_ttl_s=3600.0)
    user = "+15550004444"
    assert bot.send("one", sender=user).messages == ["[turn 1] one"]
    clock.advance(3599.0)  # silent for just under the TTL: the conversation goes on, and its age restarts
    assert bot.send("two", sender=user).messages == ["[turn 2] two"]
    clock.advance(3599.0)
    assert bot.send("three", sender=user).messages == ["[turn 3] three"]
    clock.advance(3600.0)
    assert bot.send("four", sender=user).messages == ["[turn 1] four"]
    calls = sim.calls()
    assert [c["previous_response_id"] is None for c in calls] == [True, False, False, True]
    assert calls[1]["previous_response_id"] == calls[0]["id"]
    if backend == "redis":
        import redis

        # Redis forgets the conversation by itself too: each answer set the key again with the TTL as its expiry.
        with redis.Redis.from_url(store) as client:
            [key] = client.keys("wabot:conversation:*")
            assert 3500 < client.ttl(key) <= 3600


def test_sqlite_purges_expired_conversations_in_its_periodic_purge(make_bot: Callable[..., Bot], sim) -> None:
    import sqlite3

    clock = DrivenClock()
    bot = make_bot(clock=clock, conversation_ttl_s=3600.0)
    path = bot.settings.store.removeprefix("sqlite:///")
    bot.send("old", sender="+15550005555")
    bot.send("recent", sender="+15550006666")
    clock.advance(3000.0)
    bot.send("again", sender="+15550006666")
    clock.advance(1000.0)  # the first user silent for 4000 s, the second for 1000 s
    # The purge rides on the accept of any message, at most once a minute on the bot's clock.
    bot.send("hello", sender="+15550008888")
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT COUNT(*) FROM conversations").fetchone()[0]
        plan = db.execute("EXPLAIN QUERY PLAN DELETE FROM conversations WHERE updated_at < 0").fetchall()
    assert rows == 2  # the second user's and the newcomer's
    assert any("conversations_age" in str(step) for step in plan), plan  # a range on the index, not a scan


def test_a_long_answer_inline_takes_at_most_max_reply_parts_with_a_marker(
    make_bot: Callable[..., Bot], sim, log_lines: LogLines
) -> None:
    bot = make_bot(max_output_tokens=100_000, reply_timeout=4.0)
    before = metric(PARTS)
    mark = log_lines.mark()
    posted = bot.send("tell me everything [sim:long=20000]")
    assert len(posted.messages) == bot.settings.max_reply_parts == 4
    assert all(len(part) <= TWILIO_MAX_CHARS for part in posted.messages)
    assert posted.messages[0].startswith("Sentence 1 of the long answer.")
    assert posted.messages[-1].endswith(SHORTENED_MARKER)
    assert not any(SHORTENED_MARKER in part for part in posted.messages[:-1])
    assert metric(PARTS) == before + 4
    cut = [e for e in log_lines.events(mark) if e["event"] == "answer_shortened"]
    assert len(cut) == 1
    assert (cut[0]["parts_needed"], cut[0]["parts_sent"], cut[0]["max_reply_parts"]) == (13, 4, 4)
    assert "Sentence" not in str(cut[0])  # no body text without WABOT_LOG_MESSAGE_BODIES

    # An answer within the cap is sent whole, and counted part by part.
    assert len(bot.send("and a shorter one [sim:long=3300]").messages) == 3
    assert metric(PARTS) == before + 7


def test_a_long_followup_takes_at_most_max_reply_parts_with_a_marker(make_bot: Callable[..., Bot], sim, sink) -> None:
    bot = make_bot(max_output_tokens=100_000, max_reply_parts=3)
    user = "+15550007777"
    before = metric(PARTS)
    posted = bot.send("tell me everything [sim:long=20000] [sim:delay=1.3]", sender=user)
    assert posted.messages == [DEFAULT_HOLDING_MESSAGE]  # not counted: it is not a part of the answer
    parts = [m["body"] for m in sink.wait_for_messages(3, to=f"whatsapp:{user}", timeout=10)]
    bot.wait_idle()
    assert len(sink.messages(to=f"whatsapp:{user}")) == 3
    assert all(len(part) <= TWILIO_MAX_CHARS for part in parts)
    assert parts[0].startswith("Sentence 1 of the long answer.")
    assert parts[-1].endswith(SHORTENED_MARKER)
    assert metric(PARTS) == before + 3
