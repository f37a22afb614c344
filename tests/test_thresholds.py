"""telemetry/thresholds.py is the one source of every threshold: the generated rules, the dashboard, the status
view, `wabot analyze` and the runbooks agree with it, and moving a line is a change of one value.

The checks of the rules, the dashboard and the status view take a `Thresholds`, so the same checks run on the
checked-in files (against `THRESHOLDS`) and on files generated from moved thresholds.
"""

from __future__ import annotations

import ast
import dataclasses
import html
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from alerts import generate as rules_generator
from bot.settings import Settings
from bot.status import collect, render_html, render_text
from dashboards import generate as dashboard_generator
from telemetry.analyze import analyze, recommend_deadline, render_table
from telemetry.metrics import MEDIA_OUTCOMES, SECONDS_BUCKETS
from telemetry.recent import RecentActivity
from telemetry.thresholds import THRESHOLDS, Thresholds, TotalTime, duration_seconds, duration_words, seconds_name

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "alerts" / "wabot.rules.yml"
DASHBOARD = ROOT / "dashboards" / "wabot.json"
RUNBOOKS = ROOT / "alerts" / "runbooks"
# Every module that draws a line or fires on one; none may write a threshold itself.
READERS = (
    "alerts/generate.py",
    "dashboards/generate.py",
    "bot/status.py",
    "telemetry/analyze.py",
    "telemetry/recent.py",
)


def moved_slow_line(seconds: int) -> Thresholds:
    """THRESHOLDS with the 12 s line moved to `seconds`: the one value an operator edits."""
    return dataclasses.replace(THRESHOLDS, total_time=dataclasses.replace(THRESHOLDS.total_time, slow_s=seconds))


def _pct(ratio: float) -> str:
    return f"{ratio * 100:g} %"


# ---------------------------------------------------------------------------------------------------- rules


def _rules(text: str) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """(recording rules by name, alert rules by alert name) of a rules file's text."""
    records: dict[str, dict[str, Any]] = {}
    alerts: dict[str, list[dict[str, Any]]] = {}
    for group in yaml.safe_load(text)["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                records[rule["record"]] = rule
            else:
                alerts.setdefault(rule["alert"], []).append(rule)
    return records, alerts


def _burn_threshold(expr: str) -> tuple[float, float]:
    """(factor, budget) of a burn-rate alert's `> (factor * budget)` comparisons (both windows use the same)."""
    found = set(re.findall(r"> \(([\d.e-]+) \* ([\d.e-]+)\)", expr))
    assert len(found) == 1, expr
    ((factor, budget),) = found
    return float(factor), float(budget)


def assert_rules_follow(text: str, t: Thresholds) -> None:
    records, alerts = _rules(text)
    w, a, lines = t.alerts.window, t.alerts, t.total_time
    slow, limit = seconds_name(lines.slow_s), seconds_name(lines.twilio_limit_s)

    for name, duration in t.for_.items():
        (rule,) = alerts[name]
        assert rule["for"] == duration, name
    gate = f"and on (job)\nwabot:messages:increase{w} >= {a.min_messages}"
    for name, record, line in (
        ("WabotAITimeoutRatioHigh", f"wabot:ai_timeout:ratio_rate{w}", a.timeout_ratio),
        ("WabotResponseTimeHigh", f"wabot:response_over_{slow}:ratio_rate{w}", a.slow_reply_ratio),
        ("WabotRunsAtCapacity", f"wabot:ai_busy:ratio_rate{w}", a.busy_ratio),
    ):
        (rule,) = alerts[name]
        comparison, _, rest = rule["expr"].partition("\n")
        recorded, value = comparison.split(" > ")
        assert (recorded, float(value)) == (record, line), name
        assert record in records and rest == gate, name
    (over_limit,) = alerts["WabotResponseOverTwilioLimit"]
    assert over_limit["expr"] == f"wabot:response_over_{limit}:ratio_rate{w} > 0"
    (signature,) = alerts["WabotSignatureRejections"]
    assert f'increase{w}{{reason="signature"}} > {a.signature_rejections}\n' in signature["expr"]
    (slow_alert,) = alerts["WabotResponseTimeHigh"]
    assert f"longer than {lines.slow_s} s" in slow_alert["annotations"]["summary"]

    # "Slower than the line" is the count above the line's bucket edge, in both spellings of the edge.
    for seconds in (lines.slow_s, lines.twilio_limit_s):
        expr = records[f"wabot:response_over_{seconds_name(seconds)}:ratio_rate{w}"]["expr"]
        assert f'le=~"{seconds}|{seconds}\\\\.0"' in expr

    assert_media_rules_follow(records, alerts, t)
    (down,) = alerts["WabotDown"]
    assert down["expr"] == f"up{{{t.job_selector}}} == 0\nor\nabsent(up{{{t.job_selector}}})"

    table = {(b.severity, b.for_, b.long, b.short): b.factor for b in t.slo.burn_rates}
    for stem, target, alert in (
        (f"slo_reply_{limit}", t.slo.reply_target, "WabotReplySLOBurnRateHigh"),
        ("slo_answer_delivered", t.slo.delivered_target, "WabotDeliverySLOBurnRateHigh"),
    ):
        objective = records[f"wabot:{stem}:objective"]
        assert objective["expr"] == f"vector({target})" and objective["labels"] == {"job": t.job}
        assert {w for w in t.slo.windows if f"wabot:{stem}:error_ratio_rate{w}" in records} == set(t.slo.windows)
        rows = {}
        for rule in alerts[alert]:
            labels = rule["labels"]
            rows[(labels["severity"], rule["for"], labels["long_window"], labels["short_window"])] = rule["expr"]
        assert rows.keys() == table.keys(), alert
        for (severity, for_, long, short), factor in table.items():
            expr = rows[(severity, for_, long, short)]
            assert _burn_threshold(expr) == (factor, pytest.approx(1 - target)), (alert, long)
            assert f"error_ratio_rate{long} >" in expr and f"error_ratio_rate{short} >" in expr
            assert expr.endswith(f"wabot:messages:increase{long} >= {t.slo.min_messages}"), alert
    reply = records[f"wabot:slo_reply_{limit}:error_ratio_rate{w}"]["expr"]
    assert f'le=~"{lines.twilio_limit_s}|{lines.twilio_limit_s}\\\\.0"' in reply


def test_checked_in_rules_agree_with_the_thresholds() -> None:
    assert_rules_follow(RULES.read_text(encoding="utf-8"), THRESHOLDS)


# ---------------------------------------------------------------------------------------------------- dashboard


def _panels(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = {}
    for panel in dashboard["panels"]:
        for p in [panel, *(panel.get("panels") or [])]:
            if p["type"] != "row":
                found[p["title"]] = p
    return found


def _steps(panel: dict[str, Any]) -> list[float]:
    return [s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"] if s["value"] is not None]


def assert_dashboard_follows(dashboard: dict[str, Any], rules_text: str, t: Thresholds) -> None:
    panels = _panels(dashboard)
    lines, w = t.total_time, t.alerts.window
    assert _steps(panels["Timeout ratio"]) == [t.alerts.timeout_ratio]
    assert _steps(panels[f"Timeout ratio ({w})"]) == [t.alerts.timeout_ratio]
    assert _steps(panels["Total response time p50/p95/p99"]) == [lines.slow_s, lines.twilio_limit_s]
    assert _steps(panels["p99 total time"]) == [lines.slow_s, lines.twilio_limit_s]
    assert _steps(panels["Configured deadline"]) == [lines.slow_s]
    over = panels[f"Replies over {lines.slow_s} s / {lines.twilio_limit_s} s"]
    assert _steps(over) == [pytest.approx(1 - t.slo.reply_target)]
    assert [x["legendFormat"] for x in over["targets"]] == [f"over {lines.slow_s} s", f"over {lines.twilio_limit_s} s"]
    assert _steps(panels["SLO burn rate"]) == sorted(b.factor for b in t.slo.burn_rates)
    assert _steps(panels["Follow-ups pending"]) == [t.dashboard.followups_pending]
    assert _steps(panels["SLO error budget"]) == [0, t.dashboard.budget_left]
    assert _steps(panels["Attachment failure share"]) == [t.media.failure_ratio]
    assert _steps(panels["Typing indicator p50/p95 (arrival → accepted)"]) == [t.media.typing_line_s]
    budget = [x["expr"] for x in panels["SLO error budget"]["targets"]]
    for expr, target in zip(budget, (t.slo.reply_target, t.slo.delivered_target), strict=True):
        assert expr.endswith(f"/ (1 - {target}))"), expr
    # Every recording rule a panel reads is one the rules define: names carry lines and windows.
    records, _ = _rules(rules_text)
    used = {
        name for _, q in dashboard_generator.iter_targets(dashboard) for name in re.findall(r"wabot:[\w:]+", q["expr"])
    }
    assert used and used - records.keys() == set()


def test_checked_in_dashboard_agrees_with_the_thresholds() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert_dashboard_follows(dashboard, RULES.read_text(encoding="utf-8"), THRESHOLDS)


# ---------------------------------------------------------------------------------------------------- status


def status_of(t: Thresholds, totals: list[float]) -> dict[str, Any]:
    """The /status data (as its JSON carries it) after replies with these total times."""
    recent = RecentActivity(thresholds=t)
    for seconds in totals:
        recent.record_reply("ok", seconds)
    return json.loads(json.dumps(collect(Settings(_env_file=None), recent)))


def assert_status_follows(t: Thresholds) -> None:
    lines = t.total_time
    data = status_of(t, [lines.slow_s - 0.5, lines.slow_s + 0.5, lines.twilio_limit_s + 0.5])
    window = data["window"]
    assert window["timeout_ratio_alert_line"] == t.alerts.timeout_ratio
    assert (window["slow_line_s"], window["twilio_limit_s"]) == (lines.slow_s, lines.twilio_limit_s)
    assert window["window_s"] == duration_seconds(t.alerts.window) == t.status_window_s
    assert window[f"over_{seconds_name(lines.slow_s)}"] == 2
    assert window[f"over_{seconds_name(lines.twilio_limit_s)}"] == 1
    said = f"2 over {lines.slow_s} s · 1 over {lines.twilio_limit_s} s (Twilio's limit)"
    assert said in render_text(data) and html.escape(said) in render_html(data)
    assert f"(below the alert line, {t.alerts.timeout_ratio * 100:.1f} %)" in render_text(data)
    assert f"amber: up to {lines.slow_s} s · red: past {lines.slow_s} s" in render_html(data)


def test_status_view_draws_the_thresholds_lines() -> None:
    assert_status_follows(THRESHOLDS)


# ---------------------------------------------------------------------------------------------------- analyze


def _analyzed(t: Thresholds) -> tuple[Any, str]:
    lines = t.total_time
    log = [
        json.dumps({"event": "ai_processing_time", "elapsed_seconds": 3.0, "phase": "inline", "message_sid": "A"}),
        json.dumps({"event": "total_time", "total_time": 3.5, "outcome": "ok", "message_sid": "A"}),
    ]
    log += [
        json.dumps({"event": "total_time", "total_time": seconds, "outcome": "ok"})
        for seconds in (lines.slow_s - 0.5, lines.slow_s + 0.5, lines.twilio_limit_s + 0.5)
    ]
    report = analyze(log, t)
    return report, render_table(report, t)


def assert_analyze_follows(t: Thresholds) -> None:
    lines = t.total_time
    report, table = _analyzed(t)
    assert (report.total_time_over_12s, report.total_time_over_15s) == (2, 1)
    assert f"over {lines.slow_s} s " in table and f"over {lines.twilio_limit_s} s (Twilio drops)" in table
    # 0.5 s of overhead: the longest deadline on the 0.5 s grid that keeps total time within the slow line.
    assert report.recommendation.deadline_seconds == lines.slow_s - 0.5
    assert f"keeps total time within {lines.slow_s} s" in report.recommendation.reason


def test_analyze_counts_and_recommends_against_the_thresholds_lines() -> None:
    assert_analyze_follows(THRESHOLDS)
    assert recommend_deadline([3.0], [], [0.5]).deadline_seconds == THRESHOLDS.total_time.slow_s - 0.5


# ---------------------------------------------------------------------------------------------------- one line


def test_moving_the_12s_line_is_one_value_and_every_place_follows() -> None:
    moved = moved_slow_line(10)
    changed = [
        f.name
        for f in dataclasses.fields(TotalTime)
        if getattr(moved.total_time, f.name) != getattr(THRESHOLDS.total_time, f.name)
    ]
    assert changed == ["slow_s"]
    assert dataclasses.replace(moved, total_time=THRESHOLDS.total_time) == THRESHOLDS

    rules = rules_generator.render(t=moved)
    assert_rules_follow(rules, moved)
    dashboard = dashboard_generator.dashboard_json(moved)
    assert_dashboard_follows(dashboard, rules, moved)
    assert_status_follows(moved)
    assert_analyze_follows(moved)
    # Nothing still speaks of the old line.
    old = THRESHOLDS.total_time.slow_s
    for text in (rules, json.dumps(dashboard, ensure_ascii=False), render_text(status_of(moved, [9.0, 16.0]))):
        assert f"{old} s" not in text and f"{old}s" not in text and f'le=~"{old}' not in text
    # The checked-in files are what the unmoved thresholds generate (the stale-file tests say so too).
    assert rules_generator.render() == RULES.read_text(encoding="utf-8")
    assert dashboard_generator.render() == DASHBOARD.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- media (#14)


def assert_media_rules_follow(
    records: dict[str, dict[str, Any]], alerts: dict[str, list[dict[str, Any]]], t: Thresholds
) -> None:
    w, m = t.alerts.window, t.media
    for name, record, line, gate, least in (
        (
            "WabotMediaFailing",
            f"wabot:media_failure:ratio_rate{w}",
            m.failure_ratio,
            f"wabot:media_read:increase{w}",
            m.min_attachments,
        ),
        (
            "WabotTypingIndicatorsFailing",
            f"wabot:typing_indicator_failure:ratio_rate{w}",
            m.typing_failure_ratio,
            f"wabot:typing_indicators:increase{w}",
            m.min_typing_indicators,
        ),
    ):
        (rule,) = alerts[name]
        comparison, on_job, gated = rule["expr"].split("\n")
        recorded, value = comparison.split(" > ")
        assert (recorded, float(value)) == (record, line), name
        gate_record, _, minimum = gated.partition(" >= ")
        assert (on_job, gate_record) == ("and on (job)", gate), name
        assert int(minimum) == least, name
        assert record in records and gate in records, name
        assert f"threshold {_pct(line)}, at least {least} " in rule["annotations"]["description"], name
    # The share is made of the outcomes thresholds.py names, on both sides.
    ratio = records[f"wabot:media_failure:ratio_rate{w}"]["expr"]
    assert f'outcome=~"{"|".join(m.failure_outcomes)}"' in ratio and f'outcome=~"{"|".join(m.read_outcomes)}"' in ratio


def moved_media_lines() -> Thresholds:
    """THRESHOLDS with every line of the attachment and typing-indicator alerts moved."""
    media = dataclasses.replace(
        THRESHOLDS.media,
        failure_ratio=0.3,
        min_attachments=8,
        typing_failure_ratio=0.4,
        min_typing_indicators=20,
        typing_line_s=2,
    )
    return dataclasses.replace(THRESHOLDS, media=media)


def test_media_outcomes_are_the_metrics_labels() -> None:
    m = THRESHOLDS.media
    assert set(m.failure_outcomes) < set(m.read_outcomes) <= set(MEDIA_OUTCOMES)
    # What is left out is the sender's: over the size cap or a type the bot cannot read.
    assert set(MEDIA_OUTCOMES) - set(m.read_outcomes) == {"too_large", "unsupported"}


def test_moving_the_media_lines_is_one_value_each_and_every_place_follows() -> None:
    moved = moved_media_lines()
    rules = rules_generator.render(t=moved)
    assert_rules_follow(rules, moved)
    assert_dashboard_follows(dashboard_generator.dashboard_json(moved), rules, moved)
    recent = RecentActivity(thresholds=moved)
    for _ in range(7):
        recent.record_media("image", "fetch_error")
    recent.record_typing("sent", 1.5)
    data = json.loads(json.dumps(collect(Settings(_env_file=None), recent)))
    media, typing = data["window"]["media"], data["window"]["typing"]
    assert (media["failure_ratio_alert_line"], media["min_attachments"]) == (0.3, 8)
    assert (typing["failure_ratio_alert_line"], typing["min_indicators"], typing["line_s"]) == (0.4, 20, 2)
    text = render_text(data)
    assert "failure share 100.0 % of 7, below the alert's gate of 8" in text
    assert "arrival → accepted p95 1.50 s (line 2 s)" in text
    assert '<div class="tile ok"><dt>Typing indicators</dt>' in render_html(data)  # 1.5 s is within 2 s now
    # The runbooks quote the moved lines: both pages are named, and no other.
    assert {page for page, _ in runbook_mismatches(moved)} == {
        "WabotMediaFailing.md",
        "WabotTypingIndicatorsFailing.md",
    }


def test_renaming_the_job_is_one_value() -> None:
    renamed = dataclasses.replace(THRESHOLDS, job="wabot-svc")
    rules = rules_generator.render(t=renamed)
    assert_rules_follow(rules, renamed)
    assert THRESHOLDS.job_selector not in rules and 'job="wabot-svc"' in rules


def test_lines_are_bucket_edges_and_the_generator_refuses_others() -> None:
    for seconds in (THRESHOLDS.total_time.slow_s, THRESHOLDS.total_time.twilio_limit_s):
        assert seconds in SECONDS_BUCKETS
    assert 11 not in SECONDS_BUCKETS
    with pytest.raises(ValueError, match="SECONDS_BUCKETS"):
        rules_generator.render(t=moved_slow_line(11))


def test_durations() -> None:
    assert [duration_seconds(d) for d in ("5m", "1h30m", "3d", "500ms")] == [300, 5400, 259200, 0.5]
    assert [duration_words(d) for d in ("1m", "5m", "2h", "1d")] == ["1 minute", "5 minutes", "2 hours", "1 day"]
    for bad in ("", "5", "m5", "5 m", "1.5h"):
        with pytest.raises(ValueError, match="not a Prometheus duration"):
            duration_seconds(bad)


def _constants(path: Path) -> list[ast.Constant]:
    """Every constant in the code of a module, docstrings left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in docstrings]


def test_no_reader_writes_a_threshold_itself() -> None:
    t = THRESHOLDS
    lines = (t.total_time.slow_s, t.total_time.twilio_limit_s)
    numbers = {
        t.alerts.timeout_ratio,
        t.alerts.slow_reply_ratio,
        t.alerts.busy_ratio,
        t.slo.reply_target,
        t.slo.delivered_target,
        t.media.failure_ratio,
        t.media.typing_failure_ratio,
        t.status_window_s,
        *(float(s) for s in lines),
        *(b.factor for b in t.slo.burn_rates if not float(b.factor).is_integer()),
    }
    texts = {t.job_selector, *(f"{s} s" for s in lines), *(seconds_name(s) for s in lines), str(t.slo.reply_target)}
    windows = {t.alerts.window, *t.slo.windows}
    found = []
    for module in READERS:
        for node in _constants(ROOT / module):
            value = node.value
            # Whole seconds too (12, 15), but no other integer: 5 or 10 are counts and sizes too often.
            number = (isinstance(value, float) and value in numbers) or (type(value) is int and value in lines)
            text = isinstance(value, str) and (value in windows or any(text in value for text in texts))
            if number or text:
                found.append((module, node.lineno, value))
    assert found == []


# ---------------------------------------------------------------------------------------------------- runbooks


def runbook_figures(t: Thresholds) -> dict[str, list[str]]:
    """What each runbook page says about the numbers, as the thresholds put it."""
    w, a, lines, slo, words = t.alerts.window, t.alerts, t.total_time, t.slo, duration_words
    slow, limit = seconds_name(lines.slow_s), seconds_name(lines.twilio_limit_s)

    def fires_for(alert: str) -> str:
        return f"for {words(t.for_[alert])}."

    def rows(severity: str) -> str:
        return ", ".join(f"{b.long}/{b.short} at {b.factor:g}×" for b in slo.burn_rates if b.severity == severity)

    severity = f"critical for the fast windows ({rows('critical')}), warning for the slow ones ({rows('warning')})"
    gate = f"with at least {slo.min_messages} messages in the long window"
    return {
        "WabotDown": [f"`up{{{t.job_selector}}} == 0` or there is no `{t.job}` target", fires_for("WabotDown")],
        "WabotAITimeoutRatioHigh": [
            f"more than {_pct(a.timeout_ratio)} of the messages in the last {words(w)}",
            f"(`wabot:ai_timeout:ratio_rate{w} > {a.timeout_ratio:g}`), with at least {a.min_messages} messages "
            f"in those {words(w)}, {fires_for('WabotAITimeoutRatioHigh')}",
        ],
        "WabotResponseTimeHigh": [
            f"more than {_pct(a.slow_reply_ratio)} of webhook replies in the last {words(w)} took longer than "
            f"{lines.slow_s} s",
            f"(`wabot:response_over_{slow}:ratio_rate{w} > {a.slow_reply_ratio:g}`, exact from the {lines.slow_s} s "
            f"bucket edge), with at least {a.min_messages} messages, {fires_for('WabotResponseTimeHigh')}",
            f"close to Twilio's {lines.twilio_limit_s} s limit",
        ],
        "WabotResponseOverTwilioLimit": [
            f"any webhook reply in the last {words(w)} took longer than {lines.twilio_limit_s} s "
            f"(`wabot:response_over_{limit}:ratio_rate{w} > 0`), {fires_for('WabotResponseOverTwilioLimit')}",
            f"Twilio gives up on a webhook answer after {lines.twilio_limit_s} s.",
        ],
        "WabotAIErrors": [
            f"in the last {words(w)} (`wabot:ai_errors:increase{w} > 0`",
            fires_for("WabotAIErrors").rstrip("."),
        ],
        "WabotFollowupsFailing": [
            f"in the last {words(w)} (`wabot:followups_failed:increase{w} > 0`",
            fires_for("WabotFollowupsFailing"),
        ],
        "WabotMessageDeliveryFailing": [
            f"in the last {words(w)} (`wabot:message_delivery_failures:increase{w} > 0`",
            fires_for("WabotMessageDeliveryFailing"),
        ],
        "WabotRunsAtCapacity": [
            f"more than {_pct(a.busy_ratio)} of the messages in the last {words(w)}",
            f"(`wabot:ai_busy:ratio_rate{w} > {a.busy_ratio:g}`), with at least {a.min_messages} messages in those "
            f"{words(w)}, {fires_for('WabotRunsAtCapacity')}",
        ],
        "WabotSignatureRejections": [
            f"more than {a.signature_rejections} webhook requests were rejected",
            f"in the last {words(w)}, or any",
            f'(`wabot:webhook_rejections:increase{w}{{reason="signature"}}`), {fires_for("WabotSignatureRejections")}',
        ],
        "WabotStoreErrors": [
            f"in the last {words(w)} (`wabot:store_errors:increase{w} > 0`",
            fires_for("WabotStoreErrors"),
        ],
        **spend_runbook_figures(t),
        "WabotReplySLOBurnRateHigh": [
            severity,
            f"{_pct(slo.reply_target)} of webhook replies within {lines.twilio_limit_s} s",
            f'`wabot_response_seconds_count - wabot_response_seconds_bucket{{le="{lines.twilio_limit_s}"}}`',
            f"exceeds factor × {_pct(1 - slo.reply_target)}, {gate}",
            f"took longer than {lines.twilio_limit_s} s got nothing",
        ],
        "WabotDeliverySLOBurnRateHigh": [
            severity,
            f"{_pct(slo.delivered_target)} of messages get a real answer",
            f"exceeds factor × {_pct(1 - slo.delivered_target)}, {gate}",
        ],
    }


def spend_runbook_figures(t: Thresholds) -> dict[str, list[str]]:
    """What the spend alerts' runbook pages say about the numbers."""
    w, a, sp, words = t.alerts.window, t.alerts, t.spend, duration_words

    def rows(severity: str) -> str:
        return ", ".join(f"{b.long}/{b.short} at {b.factor:g}×" for b in sp.burn_rates if b.severity == severity)

    fast = next(b for b in sp.burn_rates if b.severity == "critical")
    return {
        "WabotSpendBurnRateHigh": [
            f"critical for the fast row ({rows('critical')}), warning for the slow row ({rows('warning')})",
            f"(`wabot:cost_usd:rate{fast.long} * {duration_seconds(sp.period):g}`)",
            f"The fast row fires after {words(fast.for_)}",
        ],
        "WabotBudgetRefusalsHigh": [
            f"more than {sp.budget_refusals} messages were refused in the last {words(w)} "
            f"(`wabot:budget_refusals:increase{w} > {sp.budget_refusals}`)",
            f"for {words(t.for_['WabotBudgetRefusalsHigh'])}.",
        ],
        "WabotAnswersShortenedOften": [
            f"more than {_pct(sp.shortened_ratio)} of the messages in the last {words(w)}",
            f"(`wabot:answers_shortened:ratio_rate{w} > {sp.shortened_ratio:g}`), with at least {a.min_messages} "
            f"messages in those {words(w)}, for {words(t.for_['WabotAnswersShortenedOften'])}.",
        ],
    }


def runbook_mismatches(t: Thresholds) -> list[tuple[str, str]]:
    """(page, figure) for every figure a runbook does not say as `t` has it."""
    wrong = []
    for alert, figures in {**runbook_figures(t), **media_runbook_figures(t)}.items():
        text = " ".join((RUNBOOKS / f"{alert}.md").read_text(encoding="utf-8").split())
        wrong += [(f"{alert}.md", figure) for figure in figures if figure not in text]
    return wrong


def media_runbook_figures(t: Thresholds) -> dict[str, list[str]]:
    """What the attachment and typing-indicator runbooks (#14) say about their numbers."""
    w, m, words = t.alerts.window, t.media, duration_words
    return {
        "WabotMediaFailing": [
            f"more than {_pct(m.failure_ratio)} of the attachments the bot tried to read in the last {words(w)}",
            f"(`wabot:media_failure:ratio_rate{w} > {m.failure_ratio:g}`), with at least {m.min_attachments} such "
            f"attachments in those {words(w)}, for {words(t.for_['WabotMediaFailing'])}.",
            f'`outcome=~"{"|".join(m.read_outcomes)}"`',
        ],
        "WabotTypingIndicatorsFailing": [
            f"more than {_pct(m.typing_failure_ratio)} of the WhatsApp typing indicators in the last {words(w)}",
            f"(`wabot:typing_indicator_failure:ratio_rate{w} > {m.typing_failure_ratio:g}`), with at least "
            f"{m.min_typing_indicators} indicators (refreshes included) in those {words(w)}, "
            f"for {words(t.for_['WabotTypingIndicatorsFailing'])}.",
        ],
    }


def test_runbooks_quote_the_thresholds() -> None:
    """The runbooks are prose, not generated: this names the page and the figure to correct after a change."""
    assert runbook_mismatches(THRESHOLDS) == [], "runbook figures that differ from telemetry/thresholds.py"
    # After moving the 12 s line, the page that quotes it is named.
    assert {page for page, _ in runbook_mismatches(moved_slow_line(10))} == {"WabotResponseTimeHigh.md"}


def test_runbooks_name_the_dashboards_panels_as_generated() -> None:
    titles = set(_panels(json.loads(DASHBOARD.read_text(encoding="utf-8"))))
    quoted = {
        (page.name, title)
        for page in RUNBOOKS.glob("*.md")
        for title in re.findall(r'"([A-Z][^"]*)"', page.read_text(encoding="utf-8"))
        if re.search(r"\d s\b|\(\d+[smhd]\)", title)  # titles that carry a threshold or window
    }
    assert quoted and {(page, title) for page, title in quoted if title not in titles} == set()


def test_runbook_index_lists_the_burn_rate_windows() -> None:
    def rows(severity: str) -> str:
        return ", ".join(f"{b.long}/{b.short}" for b in THRESHOLDS.slo.burn_rates if b.severity == severity)

    index = (RUNBOOKS / "README.md").read_text(encoding="utf-8")
    column = f"critical ({rows('critical')}), warning ({rows('warning')})"
    assert index.count(f"| {column} |") == 2
