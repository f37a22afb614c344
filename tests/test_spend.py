"""Spend counted and bounded, through the real webhook with the OpenAI simulator: every model call's tokens and cost
by model (an unpriced model counted in tokens and flagged), the price table's setting and its start-up errors, and the
per-user daily token budget on both stores (one notice a day, the model not called, the count shared through the
store, a new day starting over, a store that fails the read letting the message through).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from bot.settings import DEFAULT_BUDGET_MESSAGE, Settings
from telemetry import analyze as analysis
from telemetry.spend import DEFAULT_PRICES, CallCost, Price, SpendWindow, parse_prices
from tests.clock import DrivenClock
from tests.conftest import Bot, LogLines, metric
from tests.forkserver import run_wabot
from tests.redis_server import RedisServer
from tests.served import DemoProcess
from tests.waiting import wait_until

SIM_PRICES = "sim-model=2/0.5/8"  # USD per million tokens for the test bots' model


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def _flush(url: str) -> None:
    import redis

    with redis.Redis.from_url(url) as client:
        client.flushall()


def test_prices_are_the_defaults_with_wabot_prices_laid_over() -> None:
    assert parse_prices("") == dict(DEFAULT_PRICES)
    table = parse_prices(" gpt-4.1-mini = 0.5/0.125/2 , ft:gpt-4.1-mini:acme::x1=1/0.25/4")
    assert table["gpt-4.1-mini"] == Price(0.5, 0.125, 2.0)
    assert table["ft:gpt-4.1-mini:acme::x1"] == Price(1.0, 0.25, 4.0)
    assert table["gpt-4o"] == DEFAULT_PRICES["gpt-4o"]
    assert set(DEFAULT_PRICES) >= {"gpt-4.1-mini", "gpt-4.1", "gpt-4o-mini", "gpt-4o", "gpt-4.1-nano"}
    assert "gpt-4o-mini-transcribe" in DEFAULT_PRICES


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("gpt-4.1=1/2", "expected model=input/cached_input/output"),
        ("gpt-4.1", "expected model=input/cached_input/output"),
        ("=1/2/3", "expected model=input/cached_input/output"),
        ("gpt-4.1=a/b/c", "prices must be numbers"),
        ("gpt-4.1=1/-1/3", "finite and not negative"),
        ("gpt-4.1=1/nan/3", "finite and not negative"),
        ("m=1/1/1,m=2/2/2", "reserved or given twice"),
        ("other=1/1/1", "reserved or given twice"),
    ],
)
def test_a_bad_price_table_is_a_start_up_error_naming_the_entry(
    value: str, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WABOT_PRICES", value)
    with pytest.raises(ValidationError) as error:
        Settings(_env_file=None)
    assert "WABOT_PRICES" in str(error.value) and words in str(error.value)


def test_budget_settings_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, bad in (
        ("WABOT_DAILY_BUDGET_USD", "-1"),
        ("WABOT_DAILY_BUDGET_USD", "inf"),
        ("WABOT_USER_DAILY_TOKENS", "-5"),
    ):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValidationError, match=name):
            Settings(_env_file=None)
        monkeypatch.delenv(name)
    settings = Settings(_env_file=None)
    assert (settings.daily_budget_usd, settings.user_daily_tokens) == (0.0, 200_000)


def test_every_call_is_counted_in_tokens_and_cost_and_logged_without_the_user(
    make_bot: Callable[..., Bot], sim, log_lines: LogLines
) -> None:
    bot = make_bot(prices=SIM_PRICES, user_daily_tokens=0)
    labels = {"model": "sim-model"}
    before = {d: metric("wabot_tokens_total", {"direction": d, **labels}) for d in ("input", "output")}
    cost_before = metric("wabot_cost_usd_total", labels)
    mark = log_lines.mark()
    user = "+15550031001"
    assert bot.send('six times seven [sim:tool=calculate:{"expression": "6*7"}]', sender=user).status == 200
    calls = sim.calls()
    assert len(calls) == 2  # the tool call and the answer: one run, two model calls
    usage = [sim.response(c["id"])["usage"] for c in calls]  # type: ignore[index]
    input_tokens = sum(u["input_tokens"] for u in usage)
    output_tokens = sum(u["output_tokens"] for u in usage)
    assert metric("wabot_tokens_total", {"direction": "input", **labels}) - before["input"] == input_tokens
    assert metric("wabot_tokens_total", {"direction": "output", **labels}) - before["output"] == output_tokens
    cost = (input_tokens * 2 + output_tokens * 8) / 1e6
    assert metric("wabot_cost_usd_total", labels) - cost_before == pytest.approx(cost)
    bot.wait_idle()  # the run's usage is logged after its answer went back
    [event] = [e for e in log_lines.events(mark) if e["event"] == "ai_usage"]
    assert event["model"] == "sim-model" and event["calls"] == 2
    assert (event["input_tokens"], event["cached_tokens"], event["output_tokens"]) == (input_tokens, 0, output_tokens)
    assert event["cost_usd"] == pytest.approx(cost) and event["new_conversation"] is True
    assert user.lstrip("+") not in str(event)  # the user only as the keyed hash
    assert len(event["user_hash"]) >= 16


def test_an_unpriced_model_is_counted_in_tokens_under_other_and_flagged(
    make_bot: Callable[..., Bot], sim, log_lines: LogLines
) -> None:
    bot = make_bot(model="sim-unpriced-model", user_daily_tokens=0)
    before = metric("wabot_tokens_total", {"direction": "output", "model": "other"})
    mark = log_lines.mark()
    bot.send("hello there", sender="+15550031002")
    bot.send("hello again", sender="+15550031003")
    bot.wait_idle()  # the runs' usage is logged after their answers went back
    assert metric("wabot_tokens_total", {"direction": "output", "model": "other"}) - before == 2 * 4  # "[turn 1] …"
    assert metric("wabot_cost_usd_total", {"model": "other"}) == 0
    flagged = [e for e in log_lines.events(mark) if e["event"] == "model_unpriced"]
    assert [(e["model"], e["level"]) for e in flagged] == [("sim-unpriced-model", "warning")]  # once per process
    usage = [e for e in log_lines.events(mark) if e["event"] == "ai_usage"]
    assert [(e["model"], e["priced"], e["cost_usd"]) for e in usage] == [("other", False, 0)] * 2


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_user_over_the_daily_tokens_gets_one_notice_a_day_and_no_model_call(
    make_bot: Callable[..., Bot], sim, log_lines: LogLines, request: pytest.FixtureRequest, backend: str
) -> None:
    store = None
    if backend == "redis":
        store = request.getfixturevalue("redis_server").url
        _flush(store)
    clock = DrivenClock()
    # Two bots on one store: what one counted, the other refuses (replicas, or workers on one SQLite file).
    first = make_bot(store=store, clock=clock, user_daily_tokens=20, prices=SIM_PRICES)
    second = make_bot(store=store or first.settings.store, clock=clock, user_daily_tokens=20, prices=SIM_PRICES)
    user, other = "+15550032001", "+15550032002"
    refusals = metric("wabot_budget_refusals_total")
    mark = log_lines.mark()
    answered = 0
    for n in range(10):  # each turn counts its input and its echo: over 20 within a few turns
        bot = first if n % 2 == 0 else second
        reply = bot.send(f"question {n}", sender=user).messages
        if reply == [DEFAULT_BUDGET_MESSAGE]:
            break
        assert reply == [f"[turn {n + 1}] question {n}"]
        answered += 1
        # A run counts its tokens just after its answer went back (bot/replies.py): on a busy machine the next
        # message could be checked before that, and refused one turn later with the count of the turn before.
        bot.wait_idle()
    else:
        pytest.fail("never over the budget")
    assert 1 <= answered < 10
    used = sum(e["input_tokens"] + e["output_tokens"] for e in log_lines.events(mark) if e["event"] == "ai_usage")
    assert used >= 20
    calls = len(sim.calls())
    # The rest of the day: an empty reply on either bot, no model call.
    assert second.send("still there?", sender=user).messages == []
    assert first.send("hello?", sender=user).messages == []
    assert len(sim.calls()) == calls
    assert metric("wabot_budget_refusals_total") - refusals == 3
    refused = [e for e in log_lines.events(mark) if e["event"] == "budget_refused"]
    assert [(e["notice"], e["limit"], e["level"]) for e in refused] == [(True, 20, "warning")] + [
        (False, 20, "warning")
    ] * 2
    assert all(e["tokens_today"] == used for e in refused)
    assert all(user not in str(e) for e in refused)
    # Another user is not affected.
    assert first.send("me too", sender=other).messages == ["[turn 1] me too"]
    # A new UTC day: the user is answered again, and gets a notice again once over.
    clock.advance(86_400)
    assert first.send("good morning", sender=user).messages[0].endswith("good morning")
    assert metric("wabot_budget_refusals_total") - refusals == 3


def test_a_store_that_fails_the_budget_read_lets_the_message_through(
    make_bot: Callable[..., Bot], sim, log_lines: LogLines, redis_server: RedisServer
) -> None:
    _flush(redis_server.url)
    bot = make_bot(store=redis_server.url, user_daily_tokens=10, prices=SIM_PRICES)
    user = "+15550033001"
    bot.send("use it all up", sender=user)
    assert bot.send("now refused", sender=user).messages == [DEFAULT_BUDGET_MESSAGE]
    errors = metric("wabot_store_errors_total", {"op": "tokens_today"})
    mark = log_lines.mark()
    redis_server.kill()
    try:
        reply = bot.send("while Redis is down", sender=user)
        # Over budget, but the count cannot be read: answering beats not answering.
        assert reply.messages == ["[turn 1] while Redis is down"]
        assert reply.elapsed < bot.settings.reply_timeout + 1.0
    finally:
        redis_server.start()
    assert metric("wabot_store_errors_total", {"op": "tokens_today"}) - errors == 1
    assert "tokens_today" in {e["op"] for e in log_lines.events(mark) if e["event"] == "store_error"}
    bot.wait_idle()


def test_status_shows_the_spend_of_the_window_and_of_today_against_the_budget(tmp_path: Path) -> None:
    env = {"WABOT_DAILY_BUDGET_USD": "2", "WABOT_PRICES": "gpt-4.1-mini=0/0/10000", "WABOT_USER_DAILY_TOKENS": "0"}
    demo = DemoProcess(tmp_path, env=env)
    try:
        demo.wait_ready()
        # A fixed short latency: the demo's default mode makes some answers slow on purpose (holding replies).
        replies = demo.send_all(
            [("one [sim:echo] [sim:delay=0.05]", "+15557670001"), ("two [sim:echo] [sim:delay=0.05]", "+15557670002")]
        )
        assert replies == [["[turn 1] one"], ["[turn 1] two"]]
        samples = demo.samples()
        output = samples[("wabot_tokens_total", (("direction", "output"), ("model", "gpt-4.1-mini")))]
        cost = samples[("wabot_cost_usd_total", (("model", "gpt-4.1-mini"),))]
        assert output == 6 and cost == pytest.approx(6 * 10_000 / 1e6)  # "[turn 1] one": 3 words, 3 tokens
        assert samples[("wabot_daily_budget_usd", ())] == 2
        response = demo.client.get(f"{demo.metrics_url}/status", params={"format": "json"})
        spent = response.json()["spend"]
        assert spent["cost_usd_window"] == pytest.approx(cost) and spent["cost_usd_today"] == pytest.approx(cost)
        assert spent["model_calls_window"] == 2 and spent["daily_budget_usd"] == 2
        assert spent["day"] == time.strftime("%Y-%m-%d", time.gmtime())
        page = demo.client.get(f"{demo.metrics_url}/status").text
        assert '<dd id="spend-window">0.0600 USD</dd>' in page and '<dd id="spend-today">0.0600 USD</dd>' in page
        assert "3% of the 2.00 USD daily budget" in page
        printed = run_wabot(["status", "--url", demo.metrics_url], cwd=Path.cwd())
        assert printed.returncode == 0, printed.stderr
        lines = printed.stdout.splitlines()
        assert any(line.startswith("  spend, last 5 minutes 0.0600 USD (") for line in lines), printed.stdout
        assert any(line.startswith("  spend today (") and "3% of the 2.00 USD daily budget" in line for line in lines)
    finally:
        demo.stop()


def test_wabot_analyze_reports_cost_per_conversation_and_the_most_expensive_hours_from_the_logs(
    make_bot: Callable[..., Bot], sim, log_lines: LogLines
) -> None:
    clock = DrivenClock()
    bot = make_bot(clock=clock, prices=SIM_PRICES, user_daily_tokens=0, conversation_ttl_s=3600.0)
    mark = log_lines.mark()
    first, second = "+15550034001", "+15550034002"
    for text in ("one", "two", "three"):
        bot.send(text, sender=first)
    bot.send("hello", sender=second)
    clock.advance(3600.0)  # the first user's conversation ends; the next message starts another
    assert bot.send("again", sender=first).messages == ["[turn 1] again"]
    bot.wait_idle()
    lines = log_lines.lines[mark:]
    usage = [e for e in log_lines.events(mark) if e["event"] == "ai_usage"]
    assert len(usage) == 5
    costs = [e["cost_usd"] for e in usage]
    expected = sorted([sum(costs[:3]), costs[3], costs[4]])

    report = analysis.analyze(lines)
    spent = report.spend
    assert spent["runs"] == 5 and spent["conversations"] == 3
    assert spent["cost_usd"] == pytest.approx(sum(costs))
    assert spent["cost_per_conversation_max"] == pytest.approx(expected[-1])
    assert spent["cost_per_conversation_p50"] == pytest.approx(expected[1])
    assert spent["cost_per_conversation_mean"] == pytest.approx(sum(costs) / 3)
    assert spent["cost_usd_by_model"] == {"sim-model": pytest.approx(sum(costs))}
    hours = spent["most_expensive_hours"]
    assert 1 <= len(hours) <= 2 and sum(h["runs"] for h in hours) == 5
    assert sum(h["cost_usd"] for h in hours) == pytest.approx(sum(costs))
    table = analysis.render_table(report)
    assert "Spend (ai_usage events)" in table and "conversations" in table
    assert f"hour {hours[0]['hour']}" in table
    assert json.loads(json.dumps(report.to_dict()))["spend"]["conversations"] == 3


def test_cached_input_tokens_are_counted_and_priced_at_the_cached_price() -> None:
    from openai.types.responses import ResponseUsage

    from telemetry import spend

    usage = ResponseUsage.model_validate(
        {
            "input_tokens": 1000,
            "input_tokens_details": {"cached_tokens": 800, "cache_write_tokens": 0},
            "output_tokens": 100,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 1100,
        }
    )
    labels = {"model": "gpt-4.1"}
    cached_before = metric("wabot_tokens_total", {"direction": "cached_input", **labels})
    cost_before = metric("wabot_cost_usd_total", labels)
    # A dated snapshot of a priced model is priced (and labelled) as that model.
    call = spend.record("gpt-4.1-2025-04-14", usage)
    assert (call.model, call.input_tokens, call.cached_tokens, call.output_tokens) == ("gpt-4.1", 1000, 800, 100)
    assert call.cost_usd == pytest.approx((200 * 2.00 + 800 * 0.50 + 100 * 8.00) / 1e6)
    assert metric("wabot_tokens_total", {"direction": "cached_input", **labels}) - cached_before == 800
    assert metric("wabot_cost_usd_total", labels) - cost_before == pytest.approx(call.cost_usd)
    assert spend.record("gpt-4.1", None).tokens == 0  # no usage reported: nothing counted


def test_readme_documents_every_spend_setting() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for name in ("WABOT_USER_DAILY_TOKENS", "WABOT_BUDGET_MESSAGE", "WABOT_DAILY_BUDGET_USD", "WABOT_PRICES"):
        assert f"| `{name}` |" in readme, name
    assert "model=input/cached_input/output" in readme
    for model in DEFAULT_PRICES:
        assert f"| `{model}` |" in readme, model


def test_the_status_windows_spend_forgets_calls_older_than_the_window_and_keeps_today() -> None:
    """/status's spend window counts per time bucket, not per call (nothing per call stays in memory), and a call
    leaves the window's sums once the window passed it; today's sums keep it."""
    spent = SpendWindow(window_s=0.3)
    for _ in range(3):
        spent.add(CallCost("gpt-4.1-mini", 100, 0, 20, 0.001, True))
    now = spent.snapshot()
    assert (now["model_calls_window"], now["tokens_window"], now["cost_usd_window"]) == (3, 360, pytest.approx(0.003))
    wait_until(lambda: spent.snapshot()["model_calls_window"] == 0, 5.0, "the calls to leave the window")
    later = spent.snapshot()
    assert (later["tokens_window"], later["cost_usd_window"]) == (0, 0)
    assert (later["tokens_today"], later["cost_usd_today"]) == (360, pytest.approx(0.003))
