"""The status view as an operator reads it: /status on the metrics port of a real `wabot serve --demo` process
(one worker and several), `wabot status` against it, and the alerts of a real Prometheus (Debian's `prometheus`)
evaluating a rule file whose alerts always fire.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot.settings import DEFAULT_APOLOGY_MESSAGE, DEFAULT_HOLDING_MESSAGE, Settings
from bot.status import collect, fetch_alerts, render_html, render_text
from telemetry.metrics import MEDIA_OUTCOMES, TYPING_OUTCOMES
from telemetry.recent import RecentActivity
from telemetry.thresholds import THRESHOLDS
from tests.binaries import find_binary
from tests.conftest import free_port
from tests.forkserver import run_wabot
from tests.served import ROOT, DemoProcess
from tests.test_end_to_end_alerts import Process
from tests.waiting import wait_until

REPLY_TIMEOUT_S = 1.0
FAST = "[sim:delay=0.05] [sim:echo]"  # answered within the deadline with the echo "[turn 1] <text>"
SLOW = "[sim:delay=1.5]"  # past the deadline: holding reply, then the answer as a follow-up
BROKEN = "[sim:error=400]"  # not retried by the SDK: an apology within the deadline
ALWAYS_FIRING_RULES = {
    "groups": [
        {
            "name": "status-test",
            "rules": [
                {
                    "alert": "WabotStatusTestFiring",
                    "expr": "vector(1) > 0",
                    "labels": {"severity": "warning"},
                    "annotations": {"summary": "Always firing, for the status test."},
                },
                {"alert": "WabotStatusTestPending", "expr": "vector(1) > 0", "for": "1h"},
                {"alert": "SomeoneElsesAlert", "expr": "vector(1) > 0"},  # not a wabot alert: not listed
            ],
        }
    ]
}


def wabot(*args: str) -> subprocess.CompletedProcess[str]:
    return run_wabot(list(args), cwd=ROOT)


def status_json(demo: DemoProcess) -> dict[str, Any]:
    response = demo.client.get(f"{demo.metrics_url}/status", params={"format": "json"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    return response.json()


def wait_for(what: str, probe: Any, timeout: float = 15.0) -> Any:
    """Call `probe` until it returns something truthy; fail with `what` after `timeout`."""
    return wait_until(probe, timeout, what)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[DemoProcess]:
    process = DemoProcess(tmp_path, env={"WABOT_REPLY_TIMEOUT": f"{REPLY_TIMEOUT_S:g}"})
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def test_metrics_port_status_counts_the_traffic_and_wabot_status_prints_it(demo: DemoProcess) -> None:
    empty = status_json(demo)
    assert empty["window"]["messages"] == 0 and empty["window"]["total_time_p50_s"] is None

    replies = demo.send_all(
        [
            (f"one {FAST}", "+15557660001"),
            (f"two {FAST}", "+15557660002"),
            (f"three {FAST}", "+15557660003"),
            (f"slow {SLOW}", "+15557660004"),
            (f"broken {BROKEN}", "+15557660005"),
        ]
    )
    assert replies == [
        ["[turn 1] one"],
        ["[turn 1] two"],
        ["[turn 1] three"],
        [DEFAULT_HOLDING_MESSAGE],
        [DEFAULT_APOLOGY_MESSAGE],
    ]
    # The pending gauge drops just after the delivery is recorded.
    window = wait_for(
        "the follow-up delivered and no longer pending",
        lambda: (w := status_json(demo)["window"])["followups_delivered"] == 1 and w["followups_pending"] == 0 and w,
    )
    assert {k: window[k] for k in ("messages", "answered_inline", "holding_then_followup", "errors")} == {
        "messages": 5,
        "answered_inline": 3,
        "holding_then_followup": 1,
        "errors": 1,
    }
    assert window["outcomes"] == {"ok": 3, "timeout": 1, "error": 1}
    alert_line = THRESHOLDS.alerts.timeout_ratio
    assert window["timeout_ratio"] == pytest.approx(0.2) and window["timeout_ratio_alert_line"] == alert_line
    assert (window["followups_delivered"], window["followups_failed"], window["followups_pending"]) == (1, 0, 0)
    assert window["deadline_s"] == REPLY_TIMEOUT_S
    assert sum(b["count"] for b in window["histogram"]) == 5
    assert window["histogram"][-1] == {"le": "+Inf", "count": 0}
    # The holding reply went out at the deadline (its bucket ends at 1 s or 2 s, as float rounding has it).
    assert window["total_time_p50_s"] < REPLY_TIMEOUT_S
    assert window["total_time_p50_s"] <= window["total_time_p95_s"] <= window["total_time_p99_s"] < 2.0
    assert sum(b["count"] for b in window["histogram"] if b["le"] in (1, 2)) >= 1

    assert demo.client.get(f"{demo.metrics_url}/status.json").json()["window"]["messages"] == 5
    page = demo.client.get(f"{demo.metrics_url}/status")
    assert page.headers["content-type"].startswith("text/html")
    assert '<dd id="messages">5</dd>' in page.text and '<dd id="timeout-ratio">20.0 %</dd>' in page.text
    assert "<svg" in page.text and "Set WABOT_PROMETHEUS_URL" in page.text
    # Next to the metrics, which are served as before (any other GET path), and nothing is writable.
    assert "wabot_ai_runs_total" in demo.client.get(f"{demo.metrics_url}/metrics").text
    assert demo.client.post(f"{demo.metrics_url}/status").status_code == 405

    printed = wabot("status", "--url", demo.metrics_url)
    assert printed.returncode == 0, printed.stderr
    for line in (
        "  messages             5",
        "  answered inline      3",
        "  holding + follow-up  1",
        "  errors (apology)     1",
        f"  timeout ratio        20.0 % ({'ABOVE' if alert_line < 0.2 else 'below'} the alert line, "
        f"{alert_line * 100:.1f} %)",
        "  follow-ups           0 pending · 1 delivered · 0 failed",
        "  attachments          0: none",
        "alerts: WABOT_PROMETHEUS_URL is not set",
    ):
        assert line in printed.stdout.splitlines(), printed.stdout
    assert re.search(r"^\s+≤ [12] s  █+ 1$", printed.stdout, re.M), printed.stdout
    # The process line: this bot's own memory, as /proc has it.
    process = status_json(demo)["process"]
    assert process["pid"] == demo.process.pid
    assert process["rss_mib"] == pytest.approx(demo.memory_kib()["VmRSS"] / 1024, rel=0.2)
    assert process["peak_rss_mib"] >= process["rss_mib"] > 20 and process["python_blocks"] > 10_000
    assert re.search(r"^process \d+: resident \d+ MiB \(peak \d+ MiB\) · [\d,]+ Python blocks", printed.stdout, re.M)
    assert 'id="process">process ' in page.text
    as_json = wabot("status", "--url", demo.metrics_url, "--json")
    assert json.loads(as_json.stdout)["window"]["messages"] == 5


def test_wabot_status_says_when_it_cannot_reach_the_bot() -> None:
    printed = wabot("status", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "2")
    assert printed.returncode == 1
    assert "wabot status: could not read http://127.0.0.1:" in printed.stderr


def test_with_several_workers_status_says_their_windows_are_not_visible(tmp_path: Path) -> None:
    # The deadline is not what this test is about: a patient one keeps the fast answers inline while two freshly
    # spawned workers share a loaded machine (with 1 s, a CI run once got the holding reply for the first message).
    demo = DemoProcess(tmp_path, env={"WABOT_REPLY_TIMEOUT": "4"}, workers=2)
    try:
        demo.wait_ready()
        wait_for("both workers", lambda: demo.text().count("Application startup complete.") >= 2, timeout=20)
        assert demo.send_all([(f"hi {i} {FAST}", f"+1555766010{i}") for i in range(3)]) == [
            [f"[turn 1] hi {i}"] for i in range(3)
        ]
        data = status_json(demo)
        assert data["workers"] == 2 and data["window"] is None
        assert "2 worker processes" in data["note"] and "Prometheus" in data["note"]
        assert data["since_start"]["messages"] == 3
        assert data["since_start"]["outcomes"]["ok"] == 3 and data["since_start"]["followups_pending"] == 0
        # Attachments and typing indicators by outcome, every worker's (pre-created, so each outcome is there).
        assert data["since_start"]["media"] == dict.fromkeys(MEDIA_OUTCOMES, 0)
        assert set(data["since_start"]["typing"]) == set(TYPING_OUTCOMES)
        page = demo.client.get(f"{demo.metrics_url}/status").text
        assert '<p class="note" id="note">2 worker processes answer the webhook' in page
        assert '<dd id="messages">3</dd>' in page
        # The chat page needs the demo's sink in the same process: with workers there is none.
        assert demo.client.get(f"{demo.url}/").status_code == 404
        printed = wabot("status", "--url", demo.metrics_url)
        assert "note: 2 worker processes" in printed.stdout and "since start: 3 messages" in printed.stdout
        assert "  attachments 0: none · typing indicators " in printed.stdout
        assert '<dd id="attachments">0</dd>' in page
    finally:
        demo.stop()


@pytest.mark.prometheus
def test_alerts_pending_or_firing_in_prometheus_are_listed_and_an_unreachable_one_is_said(tmp_path: Path) -> None:
    prometheus_bin = find_binary("prometheus", "prometheus", "/usr/bin/prometheus")
    rules, config = tmp_path / "rules.yml", tmp_path / "prometheus.yml"
    rules.write_text(yaml.safe_dump(ALWAYS_FIRING_RULES), encoding="utf-8")
    config.write_text(
        yaml.safe_dump({"global": {"evaluation_interval": "1s"}, "rule_files": [str(rules)]}), encoding="utf-8"
    )
    port = free_port()
    prometheus_url = f"http://127.0.0.1:{port}"
    prometheus = Process(
        "prometheus",
        [
            prometheus_bin,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        tmp_path / "prometheus.log",
    )
    demo = DemoProcess(
        tmp_path, env={"WABOT_REPLY_TIMEOUT": f"{REPLY_TIMEOUT_S:g}", "WABOT_PROMETHEUS_URL": prometheus_url}
    )
    try:
        prometheus.wait_ready(f"{prometheus_url}/-/ready")
        demo.wait_ready()
        expected = [
            {
                "name": "WabotStatusTestFiring",
                "state": "firing",
                "severity": "warning",
                "summary": "Always firing, for the status test.",
            },
            {"name": "WabotStatusTestPending", "state": "pending", "severity": "", "summary": ""},
        ]

        def listed() -> dict[str, Any] | None:
            alerts = status_json(demo)["prometheus"]
            brief = [{k: a[k] for k in ("name", "state", "severity", "summary")} for a in alerts["alerts"]]
            return alerts if brief == expected else None

        alerts = wait_for("both test alerts in /status", listed)
        assert alerts["url"] == prometheus_url and alerts["reachable"] and alerts["error"] is None
        page = demo.client.get(f"{demo.metrics_url}/status").text
        assert '<td class="firing">firing</td><td>WabotStatusTestFiring</td>' in page
        assert '<td class="pending">pending</td><td>WabotStatusTestPending</td>' in page
        assert "SomeoneElsesAlert" not in page
        printed = wabot("status", "--url", demo.metrics_url).stdout
        assert "  firing   WabotStatusTestFiring [warning] since " in printed
        assert "  pending  WabotStatusTestPending [] since " in printed

        prometheus.stop()
        started = time.monotonic()
        page = demo.client.get(f"{demo.metrics_url}/status")
        assert page.status_code == 200 and time.monotonic() - started < 5
        assert f"Prometheus unreachable at {prometheus_url}: ConnectError" in page.text
        assert '<dd id="messages">0</dd>' in page.text  # the rest of the page is still there
        unreachable = wabot("status", "--url", demo.metrics_url)
        assert unreachable.returncode == 0
        assert f"alerts: Prometheus unreachable at {prometheus_url}: ConnectError" in unreachable.stdout
    finally:
        demo.stop()
        prometheus.stop()


def test_a_prometheus_that_never_answers_costs_the_page_at_most_the_timeout() -> None:
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.monotonic()
        result = fetch_alerts(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.5)
        elapsed = time.monotonic() - started
    assert not result["reachable"] and result["error"].startswith("ReadTimeout")
    assert 0.5 <= elapsed < 2.0


def test_busy_replies_count_as_holding_and_unknown_outcomes_are_kept() -> None:
    recent = RecentActivity()
    for outcome, seconds in [("ok", 0.3), ("busy", 0.01), ("timeout", 8.0), ("error", 0.5), ("new", 1.0)]:
        recent.record_reply(outcome, seconds)
    recent.record_followup("delivered")
    recent.record_followup("failed")
    snapshot = recent.snapshot(deadline_s=8.0, pending_followups=2)
    assert snapshot["outcomes"] == {"ok": 1, "timeout": 1, "error": 1, "busy": 1, "new": 1}
    assert (snapshot["messages"], snapshot["holding_then_followup"], snapshot["answered_inline"]) == (5, 2, 1)
    assert snapshot["timeout_ratio"] == pytest.approx(0.2)  # as the alert rule counts it: timeouts only
    assert snapshot["total_time_p50_s"] == 0.5
    assert (snapshot["followups_delivered"], snapshot["followups_failed"], snapshot["followups_pending"]) == (1, 1, 2)
    counts = {b["le"]: b["count"] for b in snapshot["histogram"]}
    assert (counts[0.25], counts[0.5], counts[1], counts[8]) == (1, 2, 1, 1)


# ---------------------------------------------------------------------------------------------------- attachments


def _status_after(recent: RecentActivity) -> dict[str, Any]:
    """The status data as /status.json carries it."""
    data: dict[str, Any] = json.loads(json.dumps(collect(Settings(_env_file=None), recent)))
    return data


def test_attachments_and_typing_indicators_are_counted_as_their_alerts_count_them() -> None:
    recent = RecentActivity()
    m = THRESHOLDS.media
    # 6 the bot should read (3 failed: 50 %, at the gate) and 4 that are the senders' (never part of the share).
    for kind, outcome, transcribe_s in [
        ("audio", "ok", 1.0),
        ("audio", "ok", 3.0),
        ("audio", "transcribe_error", 9.0),
        ("image", "ok", None),
        ("image", "fetch_error", None),
        ("document", "fetch_error", None),
        ("document", "too_large", None),
        ("other", "unsupported", None),
        ("other", "unsupported", None),
        ("other", "unsupported", None),
    ]:
        recent.record_media(kind, outcome, transcribe_s)
    # 12 indicators: 3 failed (25 %, not above the line); the 2 refreshes carry no arrival time.
    for outcome, seconds in [("sent", 0.2)] * 6 + [("sent", 1.0)] + [("sent", None)] * 2 + [("failed", None)] * 3:
        recent.record_typing(outcome, seconds)
    data = _status_after(recent)
    media, typing = data["window"]["media"], data["window"]["typing"]
    assert media["outcomes"] == {"ok": 3, "too_large": 1, "unsupported": 3, "fetch_error": 2, "transcribe_error": 1}
    assert media["by_kind"]["document"] == {"fetch_error": 1, "too_large": 1}
    assert (media["attachments"], media["read"], media["failed"]) == (10, 6, 3)
    assert media["failure_ratio"] == pytest.approx(0.5)
    assert (media["failure_ratio_alert_line"], media["min_attachments"]) == (m.failure_ratio, m.min_attachments)
    # Failed transcriptions count in the times, as in wabot_transcription_seconds: 1, 3 and 9 s.
    assert (media["transcriptions"], media["transcription_p50_s"]) == (3, 3.0)
    assert media["transcription_p95_s"] == pytest.approx(8.4)
    assert typing["outcomes"] == {"sent": 9, "failed": 3}
    assert typing["failure_ratio"] == pytest.approx(0.25) and typing["line_s"] == m.typing_line_s
    assert typing["first_p50_s"] == pytest.approx(0.2) and typing["first_p95_s"] == pytest.approx(0.76)

    text = render_text(data).splitlines()
    line, typing_line = f"{m.failure_ratio * 100:.1f} %", f"{m.typing_failure_ratio * 100:.1f} %"
    for expected in (
        "  attachments          10: 3 ok · 1 too large · 3 unsupported · 2 fetch error · 1 transcribe error",
        f"                       failure share 50.0 % of 6, ABOVE the alert line {line}",
        "  transcription        p50 3.00 s · p95 8.40 s (3 voice notes)",
        f"  typing indicators    9 sent · 3 failed (failed share 25.0 % of 12, below the alert line {typing_line})",
        f"                       arrival → accepted p95 0.76 s (line {m.typing_line_s:g} s)",
    ):
        assert expected in text, "\n".join(text)
    page = render_html(data)
    assert '<div class="tile bad"><dt>Attachments</dt><dd id="attachments">10</dd>' in page
    assert '<dd id="transcription">3.00 · 8.40 s</dd>' in page
    assert '<div class="tile ok"><dt>Typing indicators</dt><dd id="typing">9 sent · 3 failed</dd>' in page


def test_a_high_share_below_the_traffic_gate_is_said_and_not_coloured() -> None:
    recent = RecentActivity()
    gate = THRESHOLDS.media.min_attachments
    for _ in range(gate - 1):
        recent.record_media("image", "fetch_error")
    for _ in range(3):
        recent.record_typing("failed")
    data = _status_after(recent)
    text = render_text(data).splitlines()
    assert f"                       failure share 100.0 % of {gate - 1}, below the alert's gate of {gate}" in text
    assert "  transcription        p50 – · p95 – (0 voice notes)" in text
    assert "                       arrival → accepted p95 – (line 1 s)" in text
    page = render_html(data)
    assert '<div class="tile ok"><dt>Attachments</dt>' in page and '<dd id="transcription">–</dd>' in page
    assert f"failed share 100.0 % of 3, below the alert&#x27;s gate of {THRESHOLDS.media.min_typing_indicators}" in page


def test_a_slow_first_indicator_turns_the_tile_amber() -> None:
    recent = RecentActivity()
    recent.record_typing("sent", THRESHOLDS.media.typing_line_s + 0.5)
    assert '<div class="tile warn"><dt>Typing indicators</dt>' in render_html(_status_after(recent))


def test_attachments_and_indicators_leave_the_window() -> None:
    recent = RecentActivity(window_s=0.2)
    recent.record_media("audio", "ok", 1.0)
    recent.record_typing("sent", 0.3)
    snapshot = recent.snapshot(deadline_s=8.0, pending_followups=0)
    assert (snapshot["media"]["attachments"], snapshot["typing"]["indicators"]) == (1, 1)

    def aged_out() -> bool:
        later = recent.snapshot(deadline_s=8.0, pending_followups=0)
        return later["media"]["attachments"] == 0 and later["typing"]["indicators"] == 0

    wait_until(aged_out, 5.0, "attachments and indicators older than the window dropped")
