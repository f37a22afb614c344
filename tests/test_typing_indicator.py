"""WhatsApp's typing indicator: real bots over HTTP, the real twilio SDK sending it to the Twilio sink.

What a user sees: "typing…" (and their message read) within a second of sending it, refreshed while a follow-up is
prepared, gone once the answer is there; never for a message the bot does not answer with a model run; and nothing
the indicator does (failing, hanging, dropping the connection) changes the reply or its time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from typing import Any
from urllib.parse import urlencode

import pytest
import structlog
import structlog.testing
from opentelemetry.trace import SpanKind, StatusCode

from bot.demo.inbound_form import new_message_sid
from bot.demo.twilio_sink import TwilioSink
from bot.outbound import TwilioSender, messaging_url
from bot.settings import DEFAULT_BUSY_MESSAGE, DEFAULT_HOLDING_MESSAGE, DEFAULT_RATE_LIMIT_MESSAGE, Settings
from bot.status import collect
from bot.typing_indicator import AFTER_HOLDING_S, BUSY_MESSAGES, TypingIndicators
from telemetry.recent import RecentActivity
from tests.clock import DrivenClock
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, Bot, LogLines, metric
from tests.specs import problems, validator
from tests.waiting import until, wait_until

SENT = {"outcome": "sent"}
FAILED = {"outcome": "failed"}


def accepted(sink: TwilioSink, sid: str) -> list[dict[str, Any]]:
    return [t for t in sink.typing_indicators() if t["message_id"] == sid and t["outcome"] == "accepted"]


def settle(bot: Bot) -> None:
    """Until no run and no indicator task is left: from then on no indicator can be sent."""

    def idle() -> bool:
        ready = bot.client.get(f"{bot.url}/readyz").json()
        return ready["runs_in_flight"] == 0 and ready["typing_indicators_in_flight"] == 0

    wait_until(idle, 15.0, "no run and no typing indicator in flight")


def typing_events(log_lines: LogLines, mark: int, sid: str) -> list[dict[str, Any]]:
    return [e for e in log_lines.events(mark) if e["event"] == "typing_indicator" and e["message_sid"] == sid]


def typing_spans(bot: Bot) -> list[Any]:
    return [s for s in bot.spans.get_finished_spans() if s.name == "twilio.typing_indicator.create"]


def test_the_indicator_reaches_twilio_within_a_second_of_arrival(
    make_bot: Callable[..., Bot], sim, sink: TwilioSink, log_lines: LogLines
) -> None:
    bot = make_bot(reply_timeout=2.0)
    sent, first = metric("wabot_typing_indicators_total", SENT), metric("wabot_typing_indicator_seconds_count")
    mark = log_lines.mark()
    form = bot.form("hello there [sim:delay=0.5]", sender="+15550700001")
    started = time.monotonic()
    posted = bot.post_form(form)
    assert posted.messages == ["[turn 1] hello there"]
    [indicator] = sink.wait_for_typing(1, message_id=form["MessageSid"], timeout=5)
    # From before the request left this process to the sink's record of the indicator: more than the bot's own
    # arrival-to-indicator time by the client's connect and send. Measured here: 0.02-0.04 s (2 cores, load 7-10).
    assert indicator["at"] - started < 1.0, indicator["at"] - started
    assert indicator["at"] < started + posted.elapsed  # before the answer, as WhatsApp shows it
    # The form as Twilio's reference defines it (CreateTypingIndicator), and nothing it does not declare.
    assert indicator["form"] == {"channel": "whatsapp", "messageId": form["MessageSid"]}
    typing_schema = validator("twilio.json", "messaging.v2.whatsapp.typing.indicator")
    assert problems(typing_schema, indicator["form"], closed=True) == []
    assert indicator["status"] == 200

    settle(bot)
    assert len(accepted(sink, form["MessageSid"])) == 1  # an inline answer needs no refresh
    assert metric("wabot_typing_indicators_total", SENT) == sent + 1
    assert metric("wabot_typing_indicator_seconds_count") == first + 1
    # /status's window (a fresh bot's) counts the same indicator.
    window = collect(bot.settings, bot.server.app.state.services.recent)["window"]["typing"]
    assert (window["outcomes"], window["indicators"]) == ({"sent": 1, "failed": 0}, 1)
    [event] = typing_events(log_lines, mark, form["MessageSid"])
    assert (event["level"], event["outcome"], event["refresh"]) == ("info", "sent", False)
    assert 0 < event["seconds"] < 1.0
    assert "error_type" not in event
    assert all("0700001" not in line for line in log_lines.lines[mark:])

    # Its span belongs to the message's trace, says nothing of the user, and went fine.
    [server] = [s for s in bot.spans.get_finished_spans() if s.name == "POST /whatsapp"]
    [span] = typing_spans(bot)
    assert span.context.trace_id == server.context.trace_id
    assert span.kind == SpanKind.CLIENT
    assert dict(span.attributes or {}) == {
        "http.request.method": "POST",
        "server.address": bot.settings.twilio_api_url.removeprefix("http://"),
        "wabot.typing.refresh": False,
    }
    assert span.status.status_code == StatusCode.UNSET


def test_no_indicator_for_rejected_duplicate_or_rate_limited_messages(
    make_bot: Callable[..., Bot], sim, sink: TwilioSink
) -> None:
    # The duplicate counts too (the rate is counted before the journal): the third message is over the limit.
    bot = make_bot(user_rate_limit=2, clock=DrivenClock(), reply_timeout=2.0)
    user = "+15550700002"
    sent = metric("wabot_typing_indicators_total", SENT)
    forged = bot.form("forged [sim:delay=0.3]", sender=user)
    assert bot.post_form(forged, signature="bm90IGEgc2lnbmF0dXJl").status == 403
    first = bot.form("first [sim:delay=0.3]", sender=user)
    assert bot.post_form(first).messages == ["[turn 1] first"]
    assert bot.post_form(first).messages == []  # the same MessageSid again: a duplicate
    notice = bot.form("second [sim:delay=0.3]", sender=user)
    assert bot.post_form(notice).messages == [DEFAULT_RATE_LIMIT_MESSAGE]
    silenced = bot.form("third [sim:delay=0.3]", sender=user)
    assert bot.post_form(silenced).messages == []

    settle(bot)
    assert len(accepted(sink, first["MessageSid"])) == 1
    assert [t["message_id"] for t in sink.typing_indicators()] == [first["MessageSid"]]
    assert metric("wabot_typing_indicators_total", SENT) == sent + 1


def test_a_busy_reply_is_the_sign_of_life_no_indicator_for_a_queued_run(
    make_bot: Callable[..., Bot], sim, sink: TwilioSink
) -> None:
    bot = make_bot(max_concurrent_runs=1, reply_timeout=1.0)
    running = bot.form("slow [sim:delay=1.5]", sender="+15550700003")
    waiting = bot.form("waiting [sim:delay=0.2]", sender="+15550700004")
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(bot.post_form, running)
        sim.wait_for_calls(1, timeout=5)  # the only model slot is taken
        busy = bot.post_form(waiting)
        assert slow.result().messages == [DEFAULT_HOLDING_MESSAGE]
    assert busy.messages == [DEFAULT_BUSY_MESSAGE]
    [late] = sink.wait_for_messages(1, to="whatsapp:+15550700004", timeout=10)
    assert late["body"] == "[turn 1] waiting"
    settle(bot)
    assert len(accepted(sink, running["MessageSid"])) == 1
    assert accepted(sink, waiting["MessageSid"]) == []


def test_refreshed_while_a_follow_up_is_prepared_and_stopped_once_it_is_sent(
    make_bot: Callable[..., Bot], sim, sink: TwilioSink, log_lines: LogLines
) -> None:
    refresh = 0.4
    bot = make_bot(reply_timeout=1.0, followup_timeout=10.0, typing_refresh_s=refresh)
    sent, first = metric("wabot_typing_indicators_total", SENT), metric("wabot_typing_indicator_seconds_count")
    mark = log_lines.mark()
    form = bot.form("think it over [sim:delay=2.6]", sender="+15550700005")
    started = time.monotonic()
    assert bot.post_form(form).messages == [DEFAULT_HOLDING_MESSAGE]
    [followup] = sink.wait_for_messages(1, to="whatsapp:+15550700005", timeout=10)
    assert followup["body"] == "[turn 1] think it over"
    settle(bot)

    got = accepted(sink, form["MessageSid"])
    at = [t["at"] for t in got]
    # Due at 0, 0.4, ..., 2.4 s; the answer is ready at 2.6 s.
    assert 5 <= len(got) <= 7, [round(t - started, 2) for t in at]
    assert at[0] - started < 1.0
    gaps = [b - a for a, b in itertools.pairwise(at)]
    assert abs(statistics.mean(gaps) - refresh) < 0.1 and max(gaps) < 2 * refresh, gaps
    # None after the answer: the last one came before the follow-up, and nothing is left to send another.
    assert at[-1] < followup["at"]
    assert len(sink.typing_indicators()) == len(got)

    events = typing_events(log_lines, mark, form["MessageSid"])
    assert [e["refresh"] for e in events] == [False] + [True] * (len(got) - 1)
    assert metric("wabot_typing_indicators_total", SENT) == sent + len(got)
    assert metric("wabot_typing_indicator_seconds_count") == first + 1  # the first one only
    assert [s.attributes["wabot.typing.refresh"] for s in typing_spans(bot)] == [False] + [True] * (len(got) - 1)


def test_typing_shows_again_soon_after_the_holding_reply_clears_it(
    make_bot: Callable[..., Bot], sim, sink: TwilioSink, log_lines: LogLines
) -> None:
    """WhatsApp clears "typing…" when the holding reply arrives: the bot sends the indicator again
    AFTER_HOLDING_S after the holding reply went back, not only at the next 20 s refresh."""
    user = "+15550700006"
    bot = make_bot(reply_timeout=1.0, followup_timeout=30.0)  # the default 20 s refresh
    sent = metric("wabot_typing_indicators_total", SENT)
    first = metric("wabot_typing_indicator_seconds_count")
    mark = log_lines.mark()
    form = bot.form("a long one [sim:delay=4.5]", sender=user)
    sink.inbound(form["MessageSid"], f"whatsapp:{user}")
    assert bot.post_form(form).messages == [DEFAULT_HOLDING_MESSAGE]
    held = time.monotonic()
    sink.replied(f"whatsapp:{user}")  # Twilio delivered the holding reply: "typing…" is gone
    assert sink.typing(f"whatsapp:{user}")["typing"] is False

    wait_until(lambda: sink.typing(f"whatsapp:{user}")["typing"], 5.0, '"typing…" shown again')
    shown = time.monotonic() - held
    assert AFTER_HOLDING_S - 0.1 < shown < AFTER_HOLDING_S + 1.0, shown
    [followup] = sink.wait_for_messages(1, to=f"whatsapp:{user}", timeout=10)
    assert followup["body"] == "[turn 1] a long one"
    settle(bot)

    # Two indicators: the sign of life at arrival and the one after the holding reply; no refresh was due before
    # the answer, and only the first one's latency is the sign of life's.
    events = typing_events(log_lines, mark, form["MessageSid"])
    assert [(e["outcome"], e["refresh"]) for e in events] == [("sent", False), ("sent", True)], events
    assert metric("wabot_typing_indicators_total", SENT) == sent + 2
    assert metric("wabot_typing_indicator_seconds_count") == first + 1
    assert len(accepted(sink, form["MessageSid"])) == 2


def test_refreshes_end_at_the_follow_up_budget_even_when_the_answer_is_later(
    make_bot: Callable[..., Bot], sim, sink: TwilioSink
) -> None:
    """A message waiting for its turn behind the user's previous one, whose follow-up Twilio keeps refusing, is
    answered after its own budget: its indicators stop at that budget (WABOT_FOLLOWUP_TIMEOUT), not with the answer."""
    budget = 2.0
    bot = make_bot(
        reply_timeout=0.5, followup_timeout=budget, typing_refresh_s=0.4, followup_give_up_s=3.5, twilio_max_attempts=2
    )
    user = "+15550700010"
    sink.inject(status=500, count=1000, to=f"whatsapp:{user}")  # every message to the user fails until given up
    first = bot.form("first [sim:delay=0.6]", sender=user)
    assert bot.post_form(first).messages == [DEFAULT_HOLDING_MESSAGE]
    second = bot.form("second [sim:delay=0.1]", sender=user)
    second_at = time.monotonic()
    assert bot.post_form(second).messages == [DEFAULT_HOLDING_MESSAGE]  # in line behind the first one
    settle(bot)
    sink.clear_faults()

    at = [t["at"] - second_at for t in accepted(sink, second["MessageSid"])]
    assert 4 <= len(at) <= 6, at  # due at 0, 0.4, ..., 1.6 s
    assert at[-1] < budget, at
    # The second message's own reply was tried only once the first one's follow-up was given up, past its budget.
    replies = [a for a in sink.attempts() if a["body"] != "[turn 1] first"]
    assert replies and min(a["at"] for a in replies) - second_at > budget


def test_an_indicator_that_cannot_start_within_a_second_of_arrival_is_skipped(
    make_bot: Callable[..., Bot], sim, sink: TwilioSink, log_lines: LogLines
) -> None:
    """Under a burst the loop runs late, and the indicator gives way to the replies (bot/typing_indicator.py). A client
    slow to send its body makes a message that late without a burst: it arrived with its headers, its run starts
    only once the body is in."""
    bot = make_bot(reply_timeout=3.0)
    mark = log_lines.mark()
    form = bot.form("slow upload [sim:delay=0.3]", sender="+15550700011")
    raw = urlencode(form).encode()

    def slowly() -> Iterator[bytes]:
        yield raw[:20]
        time.sleep(1.3)  # the slow client itself, not a wait for an outcome
        yield raw[20:]

    headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": bot.sign("/whatsapp", form)}
    response = bot.client.post(f"{bot.url}/whatsapp", content=slowly(), headers=headers)
    assert response.status_code == 200 and "[turn 1] slow upload" in response.text
    settle(bot)
    assert accepted(sink, form["MessageSid"]) == []
    [skipped] = [e for e in log_lines.events(mark) if e["event"] == "typing_indicator_skipped"]
    assert (skipped["message_sid"], skipped["reason"], skipped["refresh"]) == (form["MessageSid"], "late", False)
    assert typing_events(log_lines, mark, form["MessageSid"]) == []


@pytest.mark.parametrize(
    ("fault", "error_type", "error_code"),
    [
        ({"status": 500}, "twilio_server_error", 20500),
        ({"status": 429}, "rate_limited", 20429),
        ({"status": 200, "delay": 3.0}, "timeout", None),  # shown by Twilio, but answered after the bound
        ({"status": 500, "delay": 3.0}, "timeout", None),
        ({"status": 500, "reset": True}, "connection_error", None),
    ],
    ids=["500", "429", "late-answer", "hang", "dropped"],
)
def test_twilio_failing_the_indicator_changes_nothing_the_user_gets(
    make_bot: Callable[..., Bot],
    sim,
    sink: TwilioSink,
    log_lines: LogLines,
    fault: dict[str, Any],
    error_type: str,
    error_code: int | None,
) -> None:
    bot = make_bot(reply_timeout=2.0, twilio_call_timeout=0.5)
    sent, failed = metric("wabot_typing_indicators_total", SENT), metric("wabot_typing_indicators_total", FAILED)
    first = metric("wabot_typing_indicator_seconds_count")
    mark = log_lines.mark()
    form = bot.form("still answered [sim:delay=1.0]", sender="+15550700006")
    sink.inject_typing(message_id=form["MessageSid"], **fault)
    posted = bot.post_form(form)
    assert posted.messages == ["[turn 1] still answered"]
    assert posted.elapsed < 2.0  # the answer inline, as without the indicator

    settle(bot)
    [event] = typing_events(log_lines, mark, form["MessageSid"])
    assert (event["level"], event["outcome"], event["refresh"]) == ("warning", "failed", False)
    assert (event["error_type"], event["error_code"]) == (error_type, error_code)
    if error_type == "timeout":
        assert 0.5 <= event["seconds"] < 1.0  # the bound, not the sink's 3 s
    assert metric("wabot_typing_indicators_total", FAILED) == failed + 1
    assert metric("wabot_typing_indicators_total", SENT) == sent
    assert metric("wabot_typing_indicator_seconds_count") == first  # nothing was accepted in time
    [span] = typing_spans(bot)
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description == error_type
    assert span.attributes["error.type"] == error_type
    assert span.attributes.get("twilio.error_code") == error_code


def test_a_failed_indicator_is_tried_again_at_the_next_refresh(
    make_bot: Callable[..., Bot], sim, sink: TwilioSink, log_lines: LogLines
) -> None:
    bot = make_bot(reply_timeout=1.0, typing_refresh_s=0.5)
    mark = log_lines.mark()
    form = bot.form("later [sim:delay=1.2]", sender="+15550700007")
    sink.inject_typing(status=503, message_id=form["MessageSid"])
    assert bot.post_form(form).messages == [DEFAULT_HOLDING_MESSAGE]
    sink.wait_for_messages(1, to="whatsapp:+15550700007", timeout=10)
    settle(bot)
    events = typing_events(log_lines, mark, form["MessageSid"])
    assert [(e["outcome"], e["refresh"]) for e in events[:2]] == [("failed", False), ("sent", True)]
    assert events[0]["error_code"] == 20500


def test_switched_off_no_indicator_at_all(make_bot: Callable[..., Bot], sim, sink: TwilioSink) -> None:
    bot = make_bot(typing_indicator=False, reply_timeout=1.0, typing_refresh_s=0.3)
    before = (metric("wabot_typing_indicators_total", SENT), metric("wabot_typing_indicators_total", FAILED))
    inline = bot.form("inline [sim:delay=0.3]", sender="+15550700008")
    held = bot.form("held [sim:delay=1.5]", sender="+15550700009")
    assert bot.post_form(inline).messages == ["[turn 1] inline"]
    assert bot.post_form(held).messages == [DEFAULT_HOLDING_MESSAGE]
    sink.wait_for_messages(1, to="whatsapp:+15550700009", timeout=10)
    settle(bot)
    # The sink is shared by the worker's tests: an earlier test's bot may still have had an indicator on its way.
    ours = {inline["MessageSid"], held["MessageSid"]}
    assert [t for t in sink.typing_indicators() if t["message_id"] in ours] == []
    assert (metric("wabot_typing_indicators_total", SENT), metric("wabot_typing_indicators_total", FAILED)) == before


async def test_the_indicator_goes_to_twilios_messaging_host_or_wherever_the_api_url_points() -> None:
    # The real hosts by default: Messages on api.twilio.com, the typing indicator on messaging.twilio.com.
    assert Settings.model_fields["twilio_api_url"].default == "https://api.twilio.com"
    sender = TwilioSender(Settings(_env_file=None, WABOT_TWILIO_API_URL="https://api.twilio.com"), _tracer())
    try:
        assert sender.client.api.base_url == "https://api.twilio.com"
        assert sender.client.messaging.base_url == "https://messaging.twilio.com"
    finally:
        await sender.close()
    assert messaging_url("https://api.dublin.ie1.twilio.com") == "https://messaging.dublin.ie1.twilio.com"
    # Anything else (the demo's sink, a proxy) serves both APIs.
    assert messaging_url("http://127.0.0.1:8081") == "http://127.0.0.1:8081"
    assert messaging_url("https://twilio-proxy.example.com/twilio") == "https://twilio-proxy.example.com/twilio"
    assert messaging_url("https://api.example.com") == "https://api.example.com"


@contextlib.asynccontextmanager
async def _at_the_line(
    sink: TwilioSink, url: str, **settings: Any
) -> AsyncIterator[tuple[TypingIndicators, list[str], list[MutableMapping[str, Any]]]]:
    """TypingIndicators sending to the sink, with BUSY_MESSAGES messages begun and their first indicators accepted (at
    the line, not over it); the ids of those messages and of one more, not begun; the log events from the start."""
    config = Settings(
        _env_file=None,
        TWILIO_ACCOUNT_SID=ACCOUNT_SID,
        TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        WABOT_TWILIO_API_URL=url,
        WABOT_FOLLOWUP_TIMEOUT=60,
        **settings,
    )
    sender = TwilioSender(config, _tracer())
    indicators = TypingIndicators(sender.client, config, _tracer(), structlog.get_logger(), RecentActivity())
    sids = [new_message_sid() for _ in range(BUSY_MESSAGES + 1)]
    try:
        with structlog.testing.capture_logs() as logs:
            now = time.monotonic()
            for sid in sids[:BUSY_MESSAGES]:
                indicators.begin(sid, now)
            await until(lambda: all(accepted(sink, sid) for sid in sids[:BUSY_MESSAGES]), 10.0, "the first indicators")
            yield indicators, sids, logs
    finally:
        await indicators.close()
        await sender.close()


async def test_none_again_after_the_holding_reply_while_over_busy_messages_are_answered(
    sink_server: tuple[TwilioSink, str],
) -> None:
    """In a burst or an incident (every message held) one more Twilio call per held message would take the event loop
    from the holding replies: above BUSY_MESSAGES messages being answered, held() sends nothing and says why; below,
    the indicator after the holding reply is on its way."""
    sink, url = sink_server
    async with _at_the_line(sink, url) as (indicators, sids, logs):
        now = time.monotonic()
        indicators.held(sids[0], now)  # at the line: sent again after AFTER_HOLDING_S
        indicators.begin(sids[-1], now)
        indicators.held(sids[1], now)  # over it: skipped
        assert indicators.active() == BUSY_MESSAGES + 1
        skipped = [e for e in logs if e["event"] == "typing_indicator_skipped"]
        assert skipped == [
            {
                "event": "typing_indicator_skipped",
                "log_level": "debug",
                "message_sid": sids[1],
                "reason": "busy",
                "refresh": True,
            }
        ]
        # Back at the line before sids[0]'s indicator is due (over it, that one would be skipped as well).
        indicators.stop(sids[-1])
        await until(lambda: len(accepted(sink, sids[0])) == 2, 10.0, "the indicator after the holding reply")
        assert len(accepted(sink, sids[1])) == 1


async def test_no_refresh_while_over_busy_messages_are_answered(sink_server: tuple[TwilioSink, str]) -> None:
    """The model slow for everyone: refreshes would grow with the messages in flight (one per message per interval)
    and take the event loop from the holding replies. Above BUSY_MESSAGES messages being answered every refresh is
    skipped, saying why; once the count is back at the line the next refreshes go out."""
    sink, url = sink_server
    # 3 s: the 101st message is begun (over the line) well before the first refreshes are due, on a loaded host too.
    async with _at_the_line(sink, url, WABOT_TYPING_REFRESH=3.0) as (indicators, sids, logs):
        indicators.begin(sids[-1], time.monotonic())
        await until(lambda: accepted(sink, sids[-1]), 10.0, "the last message's first indicator")

        def busy_skips() -> set[str]:
            return {
                e["message_sid"]
                for e in logs
                if e["event"] == "typing_indicator_skipped" and e["reason"] == "busy" and e["refresh"]
            }

        await until(lambda: busy_skips() == set(sids), 10.0, "every message's refresh skipped")
        assert [len(accepted(sink, sid)) for sid in sids] == [1] * len(sids)
        indicators.stop(sids[-1])  # BUSY_MESSAGES left: at the line, not over it
        await until(lambda: all(len(accepted(sink, sid)) >= 2 for sid in sids[:-1]), 10.0, "the refreshes")
        assert len(accepted(sink, sids[-1])) == 1


def _tracer() -> Any:
    from opentelemetry.sdk.trace import TracerProvider

    return TracerProvider().get_tracer("test")
