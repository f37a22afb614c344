"""Tests of the log analysis (`telemetry.analyze`) against fixture logs whose answers were worked out by hand.

The expected numbers below are literals computed on paper from the fixture files in tests/fixtures/logs/
(percentiles by linear interpolation: rank r = p/100 * (n-1)), never recomputed with the code under test. The
paper used a 12 s slow line and Twilio's 15 s limit: the tests pass those lines (`PAPER`) explicitly, so moving a
line in telemetry/thresholds.py leaves them true (tests/test_thresholds.py checks that analyze follows the source).
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from telemetry import analyze as analysis
from telemetry.analyze import LineRef, Report, parse_line, percentile
from telemetry.logging import get_logger
from telemetry.thresholds import Thresholds, TotalTime

LOGS = Path(__file__).parent / "fixtures" / "logs"
approx = pytest.approx
PAPER = Thresholds(total_time=TotalTime(slow_s=12, twilio_limit_s=15))


def analyze(lines: Iterable[str]) -> Report:
    return analysis.analyze(lines, PAPER)


def recommend_deadline(*args: Any, **kwargs: Any) -> analysis.Recommendation:
    lines = {"target_total": PAPER.total_time.slow_s, "twilio_limit": PAPER.total_time.twilio_limit_s}
    return analysis.recommend_deadline(*args, **{**lines, **kwargs})


def render_table(report: Report) -> str:
    return analysis.render_table(report, PAPER)


def run(paths: list[Path], **kwargs: Any) -> int:
    return analysis.run(paths, thresholds=PAPER, **kwargs)


def _read(name: str) -> Report:
    with (LOGS / name).open(encoding="utf-8") as handle:
        return analyze(handle)


def _line(event: str, **fields: object) -> str:
    return json.dumps({"event": event, **fields})


# --- seed-style log: no ids, no level/timestamp, no phase/outcome


def test_seed_log_every_field() -> None:
    r = _read("seed.log")
    assert r.lines_read == 10
    assert r.bad_lines == 0
    assert r.first_bad_lines == []
    assert r.bad_values == 0
    assert r.period_start is None and r.period_end is None
    assert r.events == {"ai_error_in_timeout": 1, "ai_processing_time": 3, "ai_timeout": 1, "total_time": 5}
    assert r.messages == 5
    assert r.messages_counted_from == "total_time"
    assert r.outcomes == {"unknown": 5}
    assert r.timeouts == 1
    assert r.timeout_ratio == approx(0.2)
    assert r.ai_errors == 1
    assert r.ai_errors_by_type == {"TimeoutError": 1}
    assert r.ai_errors_by_phase == {"inline": 1}
    # total times sorted: 1.6, 3.25, 6.2, 8.02, 8.05
    assert r.total_time_p50 == approx(6.2)
    assert r.total_time_p95 == approx(8.044)  # rank 3.8: 8.02 + 0.8 * 0.03
    assert r.total_time_p99 == approx(8.0488)  # rank 3.96
    assert r.total_time_max == approx(8.05)
    assert r.total_time_over_12s == 0
    assert r.total_time_over_15s == 0
    # AI times sorted: 1.5, 3.2, 6.0 (no phase: the seed's runs are inline)
    assert (r.ai_runs, r.ai_runs_inline, r.ai_runs_followup) == (3, 3, 0)
    assert r.ai_processing_p50 == approx(3.2)
    assert r.ai_processing_p95 == approx(5.72)  # rank 1.9: 3.2 + 0.9 * 2.8
    assert r.ai_processing_p99 == approx(5.944)  # rank 1.98
    assert r.ai_processing_max == approx(6.0)
    assert (r.followups_sent, r.followups_failed, r.followup_delivery_rate) == (0, 0, None)
    assert r.followups_by_kind == {}
    assert r.rejections == {}
    assert r.message_statuses == {}

    rec = r.recommendation
    # Sequential pairs: 3.25-3.2=0.05, 8.02-8.001=0.019 (timeout), 1.6-1.5=0.1, error clears, 6.2-6.0=0.2.
    # p99 of 0.019, 0.05, 0.1, 0.2 = 0.1 + 0.97 * 0.1 = 0.197; floor((12 - 0.197) / 0.5) * 0.5 = 11.5.
    assert rec.overhead_samples == 4
    assert rec.overhead_measured is True
    assert rec.overhead_p99_seconds == approx(0.197)
    assert rec.deadline_seconds == 11.5
    # Known runs 3.2, 1.5, 6.0 + the timeout of unknown length (always counted as cut off).
    assert (rec.runs_considered, rec.runs_unknown_length, rec.cut_off_runs) == (4, 1, 1)
    assert rec.cut_off_share == approx(0.25)
    assert rec.current_deadline_seconds == 8.0
    assert (rec.current_cut_off_runs, rec.current_cut_off_share) == (1, approx(0.25))
    assert "11.5 s" in rec.reason and "unknown length" in rec.reason


# --- new-style log: ids, phases, follow-ups, rejections, statuses


def test_new_log_every_field() -> None:
    r = _read("new.log")
    assert r.lines_read == 35
    assert (r.bad_lines, r.first_bad_lines, r.bad_values) == (0, [], 0)
    assert r.period_start == "2025-01-10T09:00:00.100000Z"
    assert r.period_end == "2025-01-10T09:05:00Z"
    assert r.events == {
        "ai_error_in_timeout": 2,
        "ai_processing_time": 5,
        "ai_timeout": 5,
        "debug_response": 2,
        "followup_failed": 1,
        "followup_sent": 3,
        "message_status": 5,
        "total_time": 8,
        "webhook_rejected": 4,
    }
    assert (r.messages, r.messages_counted_from) == (8, "total_time")
    assert r.outcomes == {"error": 1, "ok": 2, "timeout": 5}
    assert r.timeouts == 5
    assert r.timeout_ratio == approx(0.625)
    assert r.ai_errors == 2
    assert r.ai_errors_by_type == {"APIConnectionError": 1, "RateLimitError": 1}
    assert r.ai_errors_by_phase == {"followup": 1, "inline": 1}
    # total times: 1.5, 2.5, 4.5 and five times 8.5
    assert r.total_time_p50 == approx(8.5)
    assert r.total_time_p95 == approx(8.5)
    assert r.total_time_p99 == approx(8.5)
    assert r.total_time_max == approx(8.5)
    assert (r.total_time_over_12s, r.total_time_over_15s) == (0, 0)
    # AI times sorted: 2.0, 4.0 (inline), 9.0, 10.9, 11.7 (followup)
    assert (r.ai_runs, r.ai_runs_inline, r.ai_runs_followup) == (5, 2, 3)
    assert r.ai_processing_p50 == approx(9.0)
    assert r.ai_processing_p95 == approx(11.54)  # rank 3.8: 10.9 + 0.8 * 0.8
    assert r.ai_processing_p99 == approx(11.668)  # rank 3.96
    assert r.ai_processing_max == approx(11.7)
    assert (r.followups_sent, r.followups_failed) == (3, 1)
    assert r.followup_delivery_rate == approx(0.75)
    assert r.followups_by_kind == {"answer": 2, "apology": 1}
    assert r.rejections == {"duplicate": 1, "signature": 2, "too_large": 1}
    # error_code 63016 and "63016" are one key
    assert r.message_statuses == {("delivered", None): 2, ("read", None): 1, ("undelivered", "63016"): 2}

    rec = r.recommendation
    # Seven overheads of 0.5 s (SM005 ended in an error: not a sample) -> D = 11.5.
    assert (rec.overhead_samples, rec.overhead_measured) == (7, True)
    assert rec.overhead_p99_seconds == approx(0.5)
    assert rec.deadline_seconds == 11.5
    # Known 2.0, 4.0, 9.0, 10.9, 11.7; SM007 timed out with no follow-up in the log (unknown);
    # SM004's follow-up run failed, so it had no answer to cut off.
    assert (rec.runs_considered, rec.runs_unknown_length) == (6, 1)
    assert rec.cut_off_runs == 2  # 11.7 and SM007
    assert rec.cut_off_share == approx(1 / 3)
    assert rec.current_deadline_seconds == 8.0
    assert rec.current_cut_off_runs == 4  # 9.0, 10.9, 11.7 and SM007
    assert rec.current_cut_off_share == approx(2 / 3)


# --- mixed log: prefixes, garbage, numbers as strings, a stall


def test_mixed_log_every_field() -> None:
    r = _read("mixed.log")
    assert r.lines_read == 21  # the blank line 4 is read, skipped, and not bad
    assert r.bad_lines == 6  # lines 2, 7, 8, 9, 15, 19
    assert r.first_bad_lines == [LineRef("<input>", n) for n in (2, 7, 8, 9, 15)]
    assert r.bad_values == 2  # total_time "abc" (line 14), elapsed_seconds -1 (line 20)
    assert r.period_start == "2025-01-11T10:00:03Z"
    assert r.period_end == "2025-01-11T10:01:06Z"  # 11:01:06+01:00 normalised to UTC
    assert r.events == {
        "ai_processing_time": 4,
        "ai_timeout": 1,
        "followup_failed": 1,
        "message_status": 1,
        "total_time": 5,
        "uvicorn_started": 1,
        "webhook_rejected": 1,
    }
    assert (r.messages, r.messages_counted_from) == (5, "total_time")
    assert r.outcomes == {"ok": 3, "timeout": 1, "unknown": 1}
    assert r.timeouts == 1
    assert r.timeout_ratio == approx(0.2)
    assert (r.ai_errors, r.ai_errors_by_type, r.ai_errors_by_phase) == (0, {}, {})
    # readable total times sorted: 2.5, 3.4, 14.0, 16.5
    assert r.total_time_p50 == approx(8.7)  # rank 1.5
    assert r.total_time_p95 == approx(16.125)  # rank 2.85
    assert r.total_time_p99 == approx(16.425)  # rank 2.97
    assert r.total_time_max == approx(16.5)
    assert (r.total_time_over_12s, r.total_time_over_15s) == (2, 1)
    # readable AI times sorted: 2.0, 3.0, 12.5; the -1 run counts as an event only
    assert (r.ai_runs, r.ai_runs_inline, r.ai_runs_followup) == (4, 3, 1)
    assert r.ai_processing_p50 == approx(3.0)
    assert r.ai_processing_p95 == approx(11.55)  # rank 1.9: 3.0 + 0.9 * 9.5
    assert r.ai_processing_p99 == approx(12.31)  # rank 1.98
    assert r.ai_processing_max == approx(12.5)
    assert (r.followups_sent, r.followups_failed, r.followup_delivery_rate) == (0, 1, approx(0.0))
    assert r.followups_by_kind == {}
    assert r.rejections == {"rate_limited": 1}
    assert r.message_statuses == {("failed", "63016"): 1}

    rec = r.recommendation
    # Overheads: SMa1 3.4-3.0=0.4, seed pair 2.5-2.0=0.5, SMb2 14.0-8.0=6.0 (a stall);
    # p99 = 0.5 + 0.98 * 5.5 = 5.89; floor((12 - 5.89) / 0.5) * 0.5 = 6.0.
    assert (rec.overhead_samples, rec.overhead_measured) == (3, True)
    assert rec.overhead_p99_seconds == approx(5.89)
    assert rec.deadline_seconds == 6.0
    assert (rec.runs_considered, rec.runs_unknown_length, rec.cut_off_runs) == (3, 0, 1)
    assert rec.cut_off_share == approx(1 / 3)
    assert rec.current_deadline_seconds == 8.0  # "8" as a string
    assert (rec.current_cut_off_runs, rec.current_cut_off_share) == (1, approx(1 / 3))
    assert "13.9 s" in rec.reason  # 8 s + 5.89 s breaks the 12 s target


def test_empty_file() -> None:
    r = _read("empty.log")
    assert (r.lines_read, r.bad_lines, r.messages, r.messages_counted_from) == (0, 0, 0, "none")
    assert r.timeout_ratio is None
    assert r.total_time_p50 is None and r.total_time_max is None
    assert r.ai_processing_p99 is None
    assert r.followup_delivery_rate is None
    rec = r.recommendation
    assert rec.deadline_seconds is None and rec.cut_off_share is None
    assert rec.current_deadline_seconds is None
    assert "nothing to base a deadline on" in rec.reason
    assert json.loads(json.dumps(r.to_dict()))["recommendation"]["deadline_seconds"] is None


# --- the recommendation on crafted distributions


def test_recommendation_on_crafted_log() -> None:
    lines = [
        _line("ai_processing_time", elapsed_seconds=1.0, phase="inline", message_sid="A"),
        _line("total_time", total_time=1.5, outcome="ok", message_sid="A"),
        _line("ai_processing_time", elapsed_seconds=2.0, phase="inline", message_sid="B"),
        _line("total_time", total_time=2.5, outcome="ok", message_sid="B"),
    ]
    for sid, run_time in (("C", 9.0), ("D", 10.9), ("E", 11.7)):
        lines += [
            _line("ai_timeout", elapsed_seconds=8.0, timeout_seconds=8.0, message_sid=sid),
            _line("total_time", total_time=8.5, outcome="timeout", message_sid=sid),
            _line("ai_processing_time", elapsed_seconds=run_time, phase="followup", message_sid=sid),
        ]
    rec = analyze(lines).recommendation
    assert rec.overhead_p99_seconds == approx(0.5)
    assert rec.deadline_seconds == 11.5
    assert (rec.runs_considered, rec.runs_unknown_length, rec.cut_off_runs) == (5, 0, 1)  # only 11.7 > 11.5
    assert rec.cut_off_share == approx(0.2)
    assert (rec.current_cut_off_runs, rec.current_cut_off_share) == (3, approx(0.6))


@pytest.mark.parametrize(
    ("overhead", "deadline"),
    [(0.5, 11.5), (0.1, 11.5), (0.6, 11.0), (1.2, 10.5), (2.0, 10.0), (0.0, 12.0), (11.0, 1.0)],
)
def test_recommendation_grid(overhead: float, deadline: float) -> None:
    rec = recommend_deadline([3.0], [], [overhead])
    assert rec.deadline_seconds == deadline
    assert rec.overhead_p99_seconds == approx(overhead)


def test_recommendation_boundaries() -> None:
    # A run finishing exactly at D is answered inline, not cut off.
    rec = recommend_deadline([11.5, 11.6], [], [0.5])
    assert (rec.deadline_seconds, rec.cut_off_runs, rec.cut_off_share) == (11.5, 1, approx(0.5))
    # No overhead measured: 0.1 s assumed, and said so.
    rec = recommend_deadline([3.0], [], [])
    assert (rec.deadline_seconds, rec.overhead_measured, rec.overhead_samples) == (11.5, False, 0)
    assert rec.overhead_p99_seconds == approx(0.1)
    assert "assumed" in rec.reason
    # Only timeouts of unknown length: all cut off at any deadline.
    rec = recommend_deadline([], [8.0, 8.0], [0.5], 8.0)
    assert (rec.deadline_seconds, rec.cut_off_share, rec.current_cut_off_share) == (11.5, 1.0, 1.0)
    # Overhead too large for a 1 s deadline: no recommendation, with the reason.
    rec = recommend_deadline([3.0], [], [11.2])
    assert rec.deadline_seconds is None and rec.cut_off_share is None
    assert "no deadline" in rec.reason
    # No data at all.
    rec = recommend_deadline([], [], [], 8.0)
    assert rec.deadline_seconds is None and rec.current_cut_off_share is None
    assert "nothing to base" in rec.reason
    # With a target past Twilio's limit, D + o must still stay below 15 s: 14.0 + 0.5 < 15 <= 14.5 + 0.5.
    assert recommend_deadline([3.0], [], [0.5], target_total=20.0).deadline_seconds == 14.0


# --- building blocks


def test_percentile_is_linear_like_numpy() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == approx(3.85)
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0


def test_parse_line_accepts_prefixes_and_rejects_the_rest() -> None:
    assert parse_line('2025-01-11T10:00:00Z stdout F {"event": "x"}') == {"event": "x"}
    assert parse_line('{"pod": "a"} {"event": "x", "n": {"m": 1}} trailing') == {"event": "x", "n": {"m": 1}}
    assert parse_line('{"event": "x"') is None  # truncated
    assert parse_line('{"event": 5}') is None  # event must be a string
    assert parse_line('{"no_event": 1}') is None
    assert parse_line("[1, 2]") is None
    assert parse_line("{" * 100_000) is None  # deep garbage: no crash


def test_messages_fall_back_to_ai_events_without_total_time() -> None:
    r = analyze(
        [
            _line("ai_processing_time", elapsed_seconds=1.0, phase="inline"),
            _line("ai_processing_time", elapsed_seconds=2.0),  # seed: no phase = inline
            _line("ai_processing_time", elapsed_seconds=9.0, phase="followup"),
            _line("ai_timeout", elapsed_seconds=8.0, timeout_seconds=8.0),
            _line("ai_error_in_timeout", error_type="RateLimitError", elapsed_seconds=0.5, phase="inline"),
            _line("ai_error_in_timeout", error_type="APITimeoutError", elapsed_seconds=30.0, phase="followup"),
        ]
    )
    assert (r.messages, r.messages_counted_from) == (4, "ai_events")  # 2 inline + 1 timeout + 1 inline error
    assert r.timeout_ratio == approx(0.25)
    assert r.ai_errors == 2


# --- output


def test_to_dict_is_json_safe() -> None:
    data = json.loads(json.dumps(_read("new.log").to_dict()))
    assert data["messages"] == 8
    assert data["message_statuses"] == [
        {"status": "delivered", "error_code": None, "count": 2},
        {"status": "read", "error_code": None, "count": 1},
        {"status": "undelivered", "error_code": "63016", "count": 2},
    ]
    assert data["ai_processing_p95"] == 11.54  # rounded to 6 decimals: no float noise
    assert data["recommendation"]["deadline_seconds"] == 11.5
    assert data["recommendation"]["cut_off_share"] == 0.333333
    bad = json.loads(json.dumps(_read("mixed.log").to_dict()))["first_bad_lines"]
    assert bad[0] == {"source": "<input>", "line": 2}


def test_table_contains_the_key_numbers() -> None:
    table = render_table(_read("new.log"))
    for expected in (
        "messages                     8",
        "5 (62.5%)",
        "APIConnectionError 1, RateLimitError 1",
        "11.54 s",
        "3 (answer 2, apology 1)",
        "75.0%",
        "undelivered (63016)",
        "too_large",
        "recommended deadline",
        "11.50 s",
        "2 of 6 (33.3%)",
        "4 of 6 (66.7%)",
    ):
        assert expected in table, expected
    # Aligned: every value starts in the same column.
    rows = [re.match(r"^  \S+(?: \S+)*\s{2,}(?=\S)", line) for line in table.splitlines()]
    assert len({m.end() for m in rows if m}) == 1
    mixed = render_table(_read("mixed.log"))
    assert "6 (first: <input>:2, <input>:7, <input>:8, <input>:9, <input>:15)" in mixed
    assert "16.50 s" in mixed and "6.00 s" in mixed


# --- run: files, stdin, errors


def test_run_json_on_files() -> None:
    out = io.StringIO()
    assert run([LOGS / "seed.log", LOGS / "new.log"], as_json=True, out=out) == 0
    data = json.loads(out.getvalue())
    assert data["lines_read"] == 45
    assert data["messages"] == 13
    assert data["timeouts"] == 6


def test_run_table_on_file() -> None:
    out = io.StringIO()
    assert run([LOGS / "mixed.log"], as_json=False, out=out) == 0
    text = out.getvalue()
    assert f"{LOGS / 'mixed.log'}:2" in text
    assert "over 15 s" in text


@pytest.mark.parametrize("paths", [[], [Path("-")]])
def test_run_reads_stdin(paths: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO((LOGS / "seed.log").read_text(encoding="utf-8") + "junk\n"))
    out = io.StringIO()
    assert run(paths, as_json=True, out=out) == 0
    data = json.loads(out.getvalue())
    assert (data["messages"], data["lines_read"], data["bad_lines"]) == (5, 11, 1)
    assert data["first_bad_lines"] == [{"source": "<stdin>", "line": 11}]


def test_run_missing_file_exits_1_and_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.log"
    out, err = io.StringIO(), io.StringIO()
    assert run([missing, LOGS / "seed.log"], as_json=True, out=out, err=err) == 1
    assert str(missing) in err.getvalue()
    assert json.loads(out.getvalue())["messages"] == 5  # the readable file is still reported


def test_run_reads_gzip_and_binary_garbage(tmp_path: Path) -> None:
    rotated = tmp_path / "bot.log.1.gz"
    with gzip.open(rotated, "wt", encoding="utf-8") as handle:
        handle.write((LOGS / "seed.log").read_text(encoding="utf-8"))
    binary = tmp_path / "binary.log"
    binary.write_bytes(b"\xff\xfe\x00garbage\n" + (LOGS / "seed.log").read_bytes())
    out = io.StringIO()
    assert run([rotated, binary], as_json=True, out=out) == 0
    data = json.loads(out.getvalue())
    assert (data["messages"], data["bad_lines"]) == (10, 1)


# --- attachments and typing indicators (#14): lines written by the bot's own logger


def _bot_lines(log_lines: Any, events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """`events` logged through telemetry/logging.py as the bot logs them (warning when the outcome is a failure),
    read back as the lines it wrote."""
    log = get_logger()
    since = log_lines.mark()
    for name, fields in events:
        (log.info if fields["outcome"] in ("ok", "sent") else log.warning)(name, **fields)
    wanted = {name for name, _ in events}
    return [line for line in log_lines.lines[since:] if json.loads(line)["event"] in wanted]


MEDIA_EVENTS: list[tuple[str, dict[str, Any]]] = [
    ("media", {"message_sid": "SM101", "kind": "audio", "outcome": "ok", "content_type": "audio/ogg",
               "bytes": 20480, "fetch_s": 0.2, "transcribe_s": 1.0}),
    ("media", {"message_sid": "SM102", "kind": "audio", "outcome": "ok", "content_type": "audio/mpeg",
               "bytes": 51200, "fetch_s": 0.4, "transcribe_s": 3.0}),
    ("media", {"message_sid": "SM103", "kind": "audio", "outcome": "transcribe_error", "content_type": "audio/ogg",
               "bytes": 9000, "fetch_s": 0.3, "transcribe_s": 9.0, "error_type": "timeout"}),
    ("media", {"message_sid": "SM104", "kind": "image", "outcome": "ok", "content_type": "image/jpeg",
               "bytes": 80000, "fetch_s": 0.1}),
    ("media", {"message_sid": "SM104", "kind": "image", "outcome": "fetch_error", "content_type": "image/png",
               "bytes": 0, "fetch_s": 5.0, "error_type": "http_404"}),
    ("media", {"message_sid": "SM105", "kind": "document", "outcome": "too_large", "content_type": "application/pdf",
               "bytes": 16777217, "fetch_s": 0.6}),
    ("media", {"message_sid": "SM106", "kind": "other", "outcome": "unsupported", "content_type": "video/mp4",
               "bytes": 0, "fetch_s": None}),
    ("typing_indicator", {"message_sid": "SM101", "outcome": "sent", "seconds": 0.3, "refresh": False}),
    ("typing_indicator", {"message_sid": "SM102", "outcome": "sent", "seconds": 0.5, "refresh": False}),
    ("typing_indicator", {"message_sid": "SM102", "outcome": "sent", "seconds": 20.4, "refresh": True}),
    ("typing_indicator", {"message_sid": "SM103", "outcome": "failed", "seconds": 0.9, "refresh": False,
                          "error_type": "rate_limited", "error_code": 20429}),
    ("typing_indicator", {"message_sid": "SM103", "outcome": "failed", "seconds": 40.2, "refresh": True,
                          "error_type": "timeout", "error_code": None}),
    ("typing_indicator", {"message_sid": "SM104", "outcome": "sent", "seconds": 0.7, "refresh": False}),
]  # fmt: skip


def test_media_and_typing_indicator_events_every_field(log_lines: Any) -> None:
    lines = _bot_lines(log_lines, MEDIA_EVENTS)
    assert [json.loads(line)["level"] for line in lines].count("warning") == 6
    r = analyze(lines)
    assert r.events == {"media": 7, "typing_indicator": 6}
    assert (r.messages, r.bad_lines, r.bad_values) == (0, 0, 0)  # neither is a message of its own
    m = r.media
    assert m.attachments == 7
    assert m.outcomes == {"fetch_error": 1, "ok": 3, "too_large": 1, "transcribe_error": 1, "unsupported": 1}
    assert m.by_kind == {
        "audio": {"ok": 2, "transcribe_error": 1},
        "document": {"too_large": 1},
        "image": {"fetch_error": 1, "ok": 1},
        "other": {"unsupported": 1},
    }
    # 2 of the 5 the bot should have read; the PDF over the cap and the video are the sender's.
    assert m.failure_ratio == approx(0.4)
    assert m.errors_by_type == {"http_404": 1, "timeout": 1}
    # Downloads 0.1 0.2 0.3 0.4 0.6 5.0: ranks 2.5 and 4.75.
    assert (m.fetch_p50, m.fetch_p95, m.fetch_max) == (approx(0.35), approx(3.9), 5.0)
    # Transcriptions 1, 3 and 9 s (the failed one included): rank 1.9 for p95.
    assert (m.transcriptions, m.transcription_p50, m.transcription_p95, m.transcription_max) == (
        3,
        3.0,
        approx(8.4),
        9.0,
    )
    assert (m.typing_indicators, m.typing_refreshes) == ({"failed": 2, "sent": 4}, 2)
    assert m.typing_errors == {"rate_limited (20429)": 1, "timeout": 1}
    # Arrival -> accepted of the first indicators Twilio accepted: 0.3, 0.5 and 0.7 s (refreshes and failures out).
    assert (m.typing_first_p50, m.typing_first_p95, m.typing_first_max) == (0.5, approx(0.68), 0.7)

    table = render_table(r)
    for expected in (
        "Attachments",
        "fetch_error 1, ok 3, too_large 1, transcribe_error 1, unsupported 1",
        "40.0% (download and transcription errors of those read)",
        "http_404 1, timeout 1",
        "p50 0.35 s, p95 3.90 s, max 5.00 s",
        "p50 3.00 s, p95 8.40 s, max 9.00 s",
        "failed 2, sent 4 (2 refreshes)",
        "rate_limited (20429) 1, timeout 1",
        "p50 0.50 s, p95 0.68 s, max 0.70 s",
    ):
        assert expected in table, table
    assert re.search(r"^    audio +ok 2, transcribe_error 1$", table, re.M), table
    data = json.loads(json.dumps(r.to_dict()))["media"]
    assert data["by_kind"]["image"] == {"fetch_error": 1, "ok": 1}
    assert (data["failure_ratio"], data["typing_first_p95"]) == (0.4, 0.68)


def test_media_without_events_and_with_unreadable_numbers() -> None:
    empty = analyze([_line("total_time", total_time=1.0, outcome="ok")]).media
    assert (empty.attachments, empty.failure_ratio, empty.transcription_p95, empty.typing_first_p95) == (
        0,
        None,
        None,
        None,
    )
    assert "p50 n/a, p95 n/a, max n/a" in render_table(analyze([]))
    odd = analyze(
        [
            _line("media", kind="audio", outcome="ok", fetch_s="0.5", transcribe_s="NaN"),
            _line("media", kind="other", outcome="unsupported"),
            _line("typing_indicator", outcome="sent", seconds=-1, refresh=False),
        ]
    )
    # Numbers as strings are read; NaN and negative ones are left out of the times, not bad values.
    assert (odd.media.fetch_max, odd.media.transcriptions, odd.media.typing_first_max, odd.bad_values) == (
        0.5,
        0,
        None,
        0,
    )
    # Only unsupported attachments: nothing the bot should have read, no share.
    assert analyze([_line("media", kind="other", outcome="unsupported")]).media.failure_ratio is None
