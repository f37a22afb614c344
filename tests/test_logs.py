"""Structured logs: one JSON object per line, the seed's event names and fields, trace ids that match the spans,
no message bodies by default, and no phone number anywhere a scripted conversation leaves a trace."""

from __future__ import annotations

import concurrent.futures
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan

from bot.settings import DEFAULT_APOLOGY_MESSAGE, DEFAULT_HOLDING_MESSAGE
from telemetry.privacy import UserHasher
from tests.conftest import AUTH_TOKEN, Bot, LogLines
from tests.forkserver import run_wabot
from tests.served import DEMO_AUTH_TOKEN, ROOT, DemoProcess
from tests.test_metrics import json_lines
from tests.test_tracing import OtlpHttpReceiver, flatten
from tests.waiting import wait_until

REQUIRED_KEYS = {"event", "level", "timestamp", "trace_id", "span_id"}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
SPAN_ID = re.compile(r"^[0-9a-f]{16}$")
LEVELS = {"debug", "info", "warning", "error", "critical"}


def wait_for_events(log_lines: LogLines, mark: int, expected: dict[str, int], timeout: float = 15.0) -> list[dict]:
    """Bounded poll until the log since `mark` holds at least the expected count of each event."""

    def complete() -> list[dict]:
        events = log_lines.events(mark)
        counts = Counter(e["event"] for e in events)
        return events if all(counts[name] >= n for name, n in expected.items()) else []

    counts = lambda: f"got {dict(Counter(e['event'] for e in log_lines.events(mark)))}"  # noqa: E731
    return wait_until(complete, timeout, f"log events {expected}", 0.02, details=counts)


def wait_for_span_count(bot: Bot, name: str, n: int, timeout: float = 10.0) -> list[ReadableSpan]:
    ended = lambda: len([s for s in bot.spans.get_finished_spans() if s.name == name]) >= n  # noqa: E731
    wait_until(ended, timeout, f"{n} {name!r} spans to end", 0.02)
    return list(bot.spans.get_finished_spans())


def assert_well_formed(lines: list[str]) -> list[dict[str, Any]]:
    """Every line is one JSON object carrying event, level, timestamp and the trace/span ids (null outside spans)."""
    events = []
    for line in lines:
        event = json.loads(line)
        assert isinstance(event, dict), line
        assert set(event) >= REQUIRED_KEYS, line
        assert isinstance(event["event"], str) and event["event"], line
        assert event["level"] in LEVELS, line
        assert TIMESTAMP.match(event["timestamp"]), line
        if event["trace_id"] is None:
            assert event["span_id"] is None, line
        else:
            assert TRACE_ID.match(event["trace_id"]) and SPAN_ID.match(event["span_id"]), line
        events.append(event)
    return events


def test_a_scripted_conversation_logs_the_seed_events_with_their_trace_ids(
    make_bot: Callable[..., Bot], sim, sink, log_lines: LogLines
) -> None:
    bot = make_bot(reply_timeout=0.8)
    # One sender per scenario, so each message's spans are found by its user hash.
    script = {
        "ok": ("aardvark says hi", "+15557654331"),
        "timeout": ("bison thinks slowly [sim:delay=1.5]", "+15557654332"),
        "error_followup": ("caracal breaks [sim:error=500]", "+15557654333"),
        "followup_rejected": ("dingo is late [sim:delay=1.2]", "+15557654334"),
        "undelivered": ("eland is out of reach [sim:delay=1.2]", "+15557654335"),
        "error_inline": ("ferret is refused [sim:error=400]", "+15557654336"),
    }
    sink.inject(status=400, code=63016, count=1, to="whatsapp:+15557654334")
    sink.fail_delivery(to="whatsapp:+15557654335", status="undelivered", code=63016)
    forms = {name: bot.form(body, sender=sender) for name, (body, sender) in script.items()}
    mark = log_lines.mark()
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(forms)) as pool:
        posted = dict(zip(forms, pool.map(bot.post_form, forms.values()), strict=True))
    assert posted["ok"].messages == ["[turn 1] aardvark says hi"]
    assert posted["error_inline"].messages == [DEFAULT_APOLOGY_MESSAGE]
    for name in ("timeout", "error_followup", "followup_rejected", "undelivered"):
        assert posted[name].messages == [DEFAULT_HOLDING_MESSAGE], name
    forged = bot.form("giraffe forges", sender="+15557654337")
    assert bot.post_form(forged, signature="bm90LWEtc2lnbmF0dXJl").status == 403
    assert bot.post_form(forms["ok"]).messages == []  # Twilio's retry of a message already answered

    events = wait_for_events(
        log_lines,
        mark,
        {"followup_sent": 3, "followup_failed": 1, "message_status": 6, "ai_processing_time": 4},
    )
    bot.wait_idle()
    lines = log_lines.lines[mark:]
    assert_well_formed(lines)
    sids = {form["MessageSid"]: name for name, form in forms.items()}
    mine = [e for e in events if e.get("message_sid") in sids]
    by_event: dict[str, dict[str, dict[str, Any]]] = {}
    for event in mine:
        by_event.setdefault(event["event"], {})[sids[event["message_sid"]]] = event

    def fields(event: dict[str, Any]) -> set[str]:
        return set(event) - REQUIRED_KEYS - {"message_sid"}

    # ai_processing_time {elapsed_seconds, tool_count}: the answers, inline or for a follow-up.
    assert set(by_event["ai_processing_time"]) == {"ok", "timeout", "followup_rejected", "undelivered"}
    for name, event in by_event["ai_processing_time"].items():
        assert fields(event) == {"elapsed_seconds", "tool_count", "phase"}
        assert event["tool_count"] == 0
        assert event["phase"] == ("inline" if name == "ok" else "followup")
        assert event["level"] == "info"
    assert 0 < by_event["ai_processing_time"]["ok"]["elapsed_seconds"] < 0.8
    assert 1.5 <= by_event["ai_processing_time"]["timeout"]["elapsed_seconds"] < 2.5

    # ai_timeout {elapsed_seconds, timeout_seconds, user_msg}: a length and a hash, never the text.
    assert set(by_event["ai_timeout"]) == {"timeout", "error_followup", "followup_rejected", "undelivered"}
    for name, event in by_event["ai_timeout"].items():
        assert fields(event) == {"elapsed_seconds", "timeout_seconds", "user_msg"}
        assert event["timeout_seconds"] == 0.8
        assert 0.8 <= event["elapsed_seconds"] < 1.3
        assert event["user_msg"] == UserHasher(AUTH_TOKEN).fingerprint(script[name][0])  # keyed: no hash key set
        assert event["level"] == "warning"

    # ai_error_in_timeout {error_type, elapsed_seconds}: before the deadline and after it.
    assert set(by_event["ai_error_in_timeout"]) == {"error_followup", "error_inline"}
    for event in by_event["ai_error_in_timeout"].values():
        assert fields(event) == {"error_type", "elapsed_seconds", "phase"}
        assert event["level"] == "error"
    assert by_event["ai_error_in_timeout"]["error_followup"]["error_type"] == "server_error"
    assert by_event["ai_error_in_timeout"]["error_followup"]["phase"] == "followup"
    assert by_event["ai_error_in_timeout"]["error_inline"]["error_type"] == "other"
    assert by_event["ai_error_in_timeout"]["error_inline"]["phase"] == "inline"

    # total_time {total_time} and debug_response {reply_length, tool_count, total_time}: one per answered webhook.
    assert set(by_event["total_time"]) == set(script)
    assert set(by_event["debug_response"]) == set(script)
    for name, event in by_event["total_time"].items():
        assert fields(event) == {"total_time", "outcome"}
        debug = by_event["debug_response"][name]
        assert fields(debug) == {"reply_length", "tool_count", "total_time"}
        assert debug["level"] == "debug"
        assert debug["total_time"] == event["total_time"]
        assert debug["reply_length"] == sum(len(m) for m in posted[name].messages)
        assert debug["tool_count"] == 0
        # The client's clock includes its own share (thread start, connect): up to ~0.15 s seen on a busy 2-core box.
        assert -0.01 <= posted[name].elapsed - event["total_time"] < 0.3
    assert by_event["total_time"]["ok"]["outcome"] == "ok"
    assert by_event["total_time"]["error_inline"]["outcome"] == "error"
    assert by_event["total_time"]["timeout"]["outcome"] == "timeout"

    # followup_sent / followup_failed.
    assert set(by_event["followup_sent"]) == {"timeout", "error_followup", "undelivered"}
    for name, event in by_event["followup_sent"].items():
        assert fields(event) == {"elapsed_seconds", "parts", "kind", "attempts"}
        assert (event["parts"], event["attempts"]) == (1, 1)
        assert event["kind"] == ("apology" if name == "error_followup" else "answer")
    [failed] = by_event["followup_failed"].values()
    assert failed["message_sid"] == forms["followup_rejected"]["MessageSid"]
    assert (failed["error_type"], failed["twilio_code"], failed["parts_sent"], failed["level"]) == (
        "rejected",
        63016,
        0,
        "error",
    )

    # webhook_rejected: the forged signature and the redelivery.
    rejected = [e for e in events if e["event"] == "webhook_rejected"]
    assert sorted((e["reason"], e["status_code"], e["path"]) for e in rejected) == [
        ("duplicate", 200, "/whatsapp"),
        ("signature", 403, "/whatsapp"),
    ]
    assert [e["message_sid"] for e in rejected if e["reason"] == "duplicate"] == [forms["ok"]["MessageSid"]]

    # message_status: Twilio's callbacks for the three delivered follow-ups.
    statuses = [e for e in events if e["event"] == "message_status"]
    by_sid = {m["to"]: m["sid"] for m in sink.messages()}
    undelivered_sid = by_sid["whatsapp:+15557654335"]
    assert sorted((e["status"], e["error_code"], e["level"]) for e in statuses) == [
        ("delivered", "", "info"),
        ("delivered", "", "info"),
        ("sent", "", "info"),
        ("sent", "", "info"),
        ("sent", "", "info"),
        ("undelivered", "63016", "warning"),
    ]
    assert [e["message_sid"] for e in statuses if e["status"] == "undelivered"] == [undelivered_sid]

    # Trace ids in the logs are the exported spans' ids: a log line leads to its trace.
    spans = wait_for_span_count(bot, "POST /whatsapp/status", 6)
    spans = wait_for_span_count(bot, "POST /whatsapp", len(script) + 2)
    hasher = UserHasher(AUTH_TOKEN)
    for name, (_, sender) in script.items():
        [reply] = [
            s
            for s in spans
            if s.name == "wabot.reply" and s.attributes["wabot.user.hash"] == hasher(f"whatsapp:{sender}")
        ]
        trace_id = format(reply.context.trace_id, "032x")
        server_id = format(reply.parent.span_id, "016x")
        reply_id = format(reply.context.span_id, "016x")
        for event in (e for e in mine if e["message_sid"] == forms[name]["MessageSid"]):
            if event["event"] == "webhook_rejected":
                continue  # the duplicate is a request, and a trace, of its own
            assert event["trace_id"] == trace_id, (name, event["event"])
            # Webhook events belong to the server span; the race and the run's events to wabot.reply.
            webhook_event = event["event"] in ("total_time", "debug_response")
            assert event["span_id"] == (server_id if webhook_event else reply_id), (name, event["event"])
    status_spans = {
        (format(s.context.trace_id, "032x"), format(s.context.span_id, "016x"))
        for s in spans
        if s.name == "POST /whatsapp/status" and s.kind.name == "SERVER"
    }
    assert {(e["trace_id"], e["span_id"]) for e in statuses} == status_spans
    server_spans = {
        (format(s.context.trace_id, "032x"), format(s.context.span_id, "016x")): s
        for s in spans
        if s.name == "POST /whatsapp" and s.kind.name == "SERVER"
    }
    for event in rejected:
        span = server_spans[(event["trace_id"], event["span_id"])]
        assert span.attributes["http.response.status_code"] == event["status_code"]

    # No message body reaches the bot's log lines (the sink, standing in for Twilio, logs what it was sent).
    for line in lines:
        if json.loads(line)["event"].startswith("sink: message to "):
            continue
        for word in ("aardvark", "bison", "caracal", "dingo", "eland", "ferret", "giraffe"):
            assert word not in line, line


def test_message_bodies_are_logged_only_when_opted_in(make_bot: Callable[..., Bot], sim, log_lines: LogLines) -> None:
    body = "Opted in: " + "x" * 60 + " and the tail past eighty characters [sim:delay=0.8]"
    bot = make_bot(reply_timeout=0.3, log_message_bodies=True)
    mark = log_lines.mark()
    form = bot.form(body, sender="+15557654341")
    assert bot.post_form(form).messages == [DEFAULT_HOLDING_MESSAGE]
    events = wait_for_events(log_lines, mark, {"ai_timeout": 1})
    [timeout] = [e for e in events if e["event"] == "ai_timeout" and e["message_sid"] == form["MessageSid"]]
    assert timeout["user_msg"] == body[:80]
    assert len(timeout["user_msg"]) == 80
    bot.wait_idle()


def test_no_phone_number_anywhere(make_bot: Callable[..., Bot], sim, sink, log_lines: LogLines, tmp_path: Path) -> None:
    """Everything a scripted conversation emits, in a real `wabot serve --demo` and in-process, is free of numbers."""
    numbers = ["+15557654321", "+15557654322", "+15557654323", "+15557654324", "+15557654325"]
    receiver = OtlpHttpReceiver()
    demo = DemoProcess(
        tmp_path,
        env={
            "WABOT_REPLY_TIMEOUT": "1",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        },
    )
    try:
        demo.wait_ready()
        ok, slow, failing, forged, malformed = numbers
        replies = demo.send_all(
            [
                ("hello [sim:delay=0.1] [sim:echo]", ok),
                ("slow [sim:delay=1.5] [sim:echo]", slow),
                ("broken [sim:error=500]", failing),
            ]
        )
        assert replies[0] == ["[turn 1] hello"]
        assert replies[1] == replies[2] == [DEFAULT_HOLDING_MESSAGE]
        duplicate = demo.form("again [sim:delay=0.1]", ok)
        assert demo.post(duplicate).status_code == 200
        assert demo.post(duplicate).status_code == 200
        assert demo.post(demo.form("forged", forged), signature="bm90LWEtc2lnbmF0dXJl").status_code == 403
        bad_from = demo.form("bad sender", malformed)
        bad_from["From"] = f"whatsapp:{malformed}x"
        assert demo.post(bad_from).status_code == 400
        # The CLI, as an operator would use it.
        cli = run_wabot(
            ["send", "cli hi [sim:delay=0.1] [sim:echo]", "--from", ok, "--url", demo.url],
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin", "TWILIO_AUTH_TOKEN": DEMO_AUTH_TOKEN},
        )
        assert cli.returncode == 0, cli.stderr
        assert "cli hi" in cli.stdout
        demo.wait_for_sample("wabot_message_status_total", {"status": "delivered", "error_code": ""}, 2.0)
        metrics_text = demo.scrape().text + demo.scrape("application/openmetrics-text").text
    finally:
        demo.stop()  # SIGTERM: the served process flushes its spans to the receiver on the way out
        receiver.close()
    served = demo.text()
    served_spans = flatten(receiver.exports())

    # In-process too: the bot's own log lines and every span attribute.
    bot = make_bot(reply_timeout=0.5)
    mark = log_lines.mark()
    in_process = "+15557654326"
    numbers.append(in_process)
    assert bot.send("local [sim:delay=1]", sender=in_process).messages == [DEFAULT_HOLDING_MESSAGE]
    sink.wait_for_messages(1, to=f"whatsapp:{in_process}", timeout=10)
    wait_for_events(log_lines, mark, {"message_status": 2})
    spans = wait_for_span_count(bot, "POST /whatsapp/status", 2)
    span_text = "\n".join(
        f"{s.name} {dict(s.attributes)} {dict(s.resource.attributes)} {[(e.name, e.attributes) for e in s.events]}"
        for s in spans
    )
    local_logs = "\n".join(log_lines.lines[mark:])

    # The scan is not vacuous: the output holds every kind of line the conversation produces.
    served_events = Counter(e["event"] for e in assert_well_formed(served.splitlines()))
    for event in ("total_time", "ai_timeout", "ai_error_in_timeout", "followup_sent", "message_status"):
        assert served_events[event] >= 1, (event, served_events)
    assert served_events["webhook_rejected"] == 3  # duplicate, signature, malformed
    assert "sink: message to whatsapp:+1•••••4322: [turn 1] slow" in {e["event"] for e in json_lines(served)}
    assert "wabot.reply" in span_text and "twilio.messages.create" in span_text
    assert {"POST /whatsapp", "wabot.reply", "invoke_agent", "twilio.messages.create"} <= {
        span["name"] for span in served_spans
    }
    assert "wabot_ai_runs_total" in metrics_text

    everything = {
        "wabot serve output": served,
        "wabot send output": cli.stdout + cli.stderr,
        "/metrics": metrics_text,
        "in-process logs": local_logs,
        "spans": span_text,
        "spans exported by wabot serve": "\n".join(map(str, served_spans)),
    }
    for number in numbers:
        for form in (number, number.lstrip("+"), f"whatsapp:{number}", number[2:]):
            for where, text in everything.items():
                assert form not in text, f"{form} found in {where}"
