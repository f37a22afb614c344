"""Prometheus metrics as an operator scrapes them: a real `wabot serve --demo` process, scripted traffic, /metrics.

The demo simulator runs in "normal" mode (random latency), so every message carries a `[sim:...]` directive that
fixes its outcome. Values are asserted exactly: they are what was sent.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from xml.etree import ElementTree

import httpx2
import pytest
from prometheus_client import multiprocess
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from twilio.request_validator import RequestValidator

from bot.settings import DEFAULT_APOLOGY_MESSAGE, DEFAULT_HOLDING_MESSAGE
from telemetry.metrics import SECONDS_BUCKETS, exposition
from tests.conftest import CLIENT_TLS
from tests.served import DEMO_AUTH_TOKEN, DemoProcess, listening_on
from tests.waiting import wait_until

HOLDING = [DEFAULT_HOLDING_MESSAGE]


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[DemoProcess]:
    process = DemoProcess(tmp_path, env={"WABOT_REPLY_TIMEOUT": "2.5"})
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def quiet_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoProcess]:
    """One process for the tests that send it no message (what they read, no other test changes)."""
    process = DemoProcess(tmp_path_factory.mktemp("quiet"), env={"WABOT_REPLY_TIMEOUT": "2.5"})
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def test_scraped_metrics_equal_the_scripted_traffic(demo: DemoProcess) -> None:
    ok = [
        ("quick one [sim:delay=0.1] [sim:echo]", "+15557650001"),
        ("quick two [sim:delay=0.1] [sim:echo]", "+15557650002"),
        ('six times seven [sim:delay=0.1] [sim:tool=calculate:{"expression":"6*7"}]', "+15557650003"),
    ]
    slow = [("slow one [sim:delay=3]", "+15557650004"), ("slow two [sim:delay=3]", "+15557650005")]
    failing = [("broken [sim:error=500]", "+15557650006")]
    replies = demo.send_all(ok + slow + failing)
    assert replies == [
        ["[turn 1] quick one"],
        ["[turn 1] quick two"],
        ['Tool calculate said: {"expression": "6*7", "result": 42}'],
        HOLDING,
        HOLDING,
        [DEFAULT_APOLOGY_MESSAGE],
    ]

    # Rejections: a bad signature, a wrong content type, an oversized body, a redelivered message.
    form = demo.form("forged", "+15557650007")
    assert demo.post(form, signature="bm90LWEtc2lnbmF0dXJl").status_code == 403
    response = demo.client.post(f"{demo.url}/whatsapp", content=b"{}", headers={"Content-Type": "application/json"})
    assert response.status_code == 415
    assert demo.post(demo.form("x" * 70_000, "+15557650008")).status_code == 413
    again = demo.form("quick again [sim:delay=0.1]", "+15557650009")
    assert demo.post(again).status_code == 200
    duplicate = demo.post(again)
    assert duplicate.status_code == 200
    assert list(ElementTree.fromstring(duplicate.text).iter("Message")) == []

    # Follow-ups and their delivery callbacks (sent, delivered) come back asynchronously.
    # (A callback can overtake the bot's own bookkeeping of the send it reports on: wait for both.)
    demo.wait_for_sample("wabot_followups_total", {"outcome": "delivered"}, 2.0)
    demo.wait_for_sample("wabot_message_status_total", {"status": "delivered", "error_code": ""}, 2.0)
    samples = demo.samples()
    assert value(samples, "wabot_ai_runs_total", outcome="ok") == 4.0
    assert value(samples, "wabot_ai_runs_total", outcome="timeout") == 2.0
    assert value(samples, "wabot_ai_runs_total", outcome="error") == 1.0
    assert value(samples, "wabot_ai_errors_total", phase="inline", error_type="server_error") == 1.0
    assert value(samples, "wabot_response_seconds_count") == 7.0
    assert value(samples, "wabot_ai_processing_seconds_count") == 7.0
    assert value(samples, "wabot_followups_total", outcome="delivered") == 2.0
    assert value(samples, "wabot_followups_total", outcome="failed") == 0.0
    assert value(samples, "wabot_followup_seconds_count") == 2.0
    assert value(samples, "wabot_followups_pending") == 0.0
    assert value(samples, "wabot_message_status_total", status="sent", error_code="") == 2.0
    assert value(samples, "wabot_message_status_total", status="delivered", error_code="") == 2.0
    assert value(samples, "wabot_webhook_rejections_total", reason="signature") == 1.0
    assert value(samples, "wabot_webhook_rejections_total", reason="malformed") == 1.0
    assert value(samples, "wabot_webhook_rejections_total", reason="too_large") == 1.0
    assert value(samples, "wabot_webhook_rejections_total", reason="duplicate") == 1.0
    # 4 ok + 2 slow answers + 1 tool round trip; the 500 is one SDK call (its retries are inside it).
    assert value(samples, "wabot_model_calls_total", outcome="ok") == 7.0
    assert value(samples, "wabot_model_calls_total", outcome="server_error") == 1.0
    assert value(samples, "wabot_model_calls_total", outcome="timeout") == 0.0
    assert value(samples, "wabot_tool_calls_total", tool="calculate", outcome="ok") == 1.0
    # The demo runs the default model, which has a price: tokens by direction and their cost at that price.
    model = {"model": "gpt-4.1-mini"}
    directions = ("input", "cached_input", "output")
    tokens = {d: value(samples, "wabot_tokens_total", direction=d, **model) for d in directions}
    assert tokens["input"] > 0 and tokens["output"] > 0 and tokens["cached_input"] == 0, tokens
    cost = (tokens["input"] * 0.40 + tokens["output"] * 1.60) / 1e6
    assert value(samples, "wabot_cost_usd_total", **model) == pytest.approx(cost)
    assert value(samples, "wabot_tokens_total", direction="input", model="other") is None  # never called
    assert value(samples, "wabot_reply_timeout_seconds") == 2.5
    assert value(samples, "wabot_build_info", version="0.1.0") == 1.0

    # Buckets sit on the alert thresholds: "over 12 s" and "over 15 s" are counts, not estimates.
    for histogram in ("wabot_response_seconds", "wabot_ai_processing_seconds", "wabot_followup_seconds"):
        edges = [dict(labels)["le"] for name, labels in samples if name == f"{histogram}_bucket"]
        assert edges == [str(float(b)) for b in SECONDS_BUCKETS] + ["+Inf"]
    assert value(samples, "wabot_response_seconds_bucket", le="12.0") == 7.0
    assert value(samples, "wabot_response_seconds_bucket", le="15.0") == 7.0
    # Inline answers come back within 2 s; the slow ones got the holding reply at the 2.5 s deadline.
    assert value(samples, "wabot_response_seconds_bucket", le="2.0") == 5.0
    assert value(samples, "wabot_response_seconds_bucket", le="4.0") == 7.0
    assert value(samples, "wabot_followup_seconds_bucket", le="2.0") == 0.0
    assert value(samples, "wabot_followup_seconds_bucket", le="4.0") == 2.0

    # No label carries a number, a message id or a body.
    text = demo.scrape().text
    assert "555765" not in text
    assert not re.search(r"SM[0-9a-f]{32}", text)
    assert "quick" not in text


def test_exemplars_only_in_openmetrics(demo: DemoProcess) -> None:
    # Slow enough for the typing indicator to be accepted before the answer (a faster answer cancels it).
    assert demo.send("exemplar please [sim:delay=0.5] [sim:echo]", "+15557650010") == ["[turn 1] exemplar please"]
    plain = demo.scrape()
    assert plain.headers["content-type"].startswith("text/plain")
    assert "trace_id" not in plain.text

    scraped = demo.scrape("application/openmetrics-text; version=1.0.0")
    assert scraped.headers["content-type"].startswith("application/openmetrics-text")
    exemplar_line = (
        r'^wabot_response_seconds_bucket\{le="[0-9.]+"\} 1\.0 # \{trace_id="[0-9a-f]{32}"\} [0-9.]+ [0-9.]+$'
    )
    assert re.search(exemplar_line, scraped.text, re.M)
    exemplars = {
        sample.name: sample.exemplar.labels["trace_id"]
        for family in parse_openmetrics(scraped.text)
        for sample in family.samples
        if sample.exemplar is not None
    }
    assert set(exemplars) == {
        "wabot_response_seconds_bucket",
        "wabot_ai_processing_seconds_bucket",
        "wabot_typing_indicator_seconds_bucket",
    }
    # The exemplar is the message's trace: the same id its log lines carry.
    total_time_traces = {line["trace_id"] for line in json_lines(demo.text()) if line.get("event") == "total_time"}
    assert total_time_traces == {exemplars["wabot_response_seconds_bucket"]}
    assert exemplars["wabot_ai_processing_seconds_bucket"] == exemplars["wabot_response_seconds_bucket"]
    assert exemplars["wabot_typing_indicator_seconds_bucket"] == exemplars["wabot_response_seconds_bucket"]


def test_metrics_and_webhook_ports_are_separate(quiet_demo: DemoProcess) -> None:
    demo = quiet_demo
    assert demo.client.get(f"{demo.url}/metrics").status_code == 404
    form = demo.form("to the wrong port [sim:delay=0.1]", "+15557650011")
    signature = RequestValidator(DEMO_AUTH_TOKEN).compute_signature(f"{demo.url}/whatsapp", form)
    response = demo.client.post(
        f"{demo.metrics_url}/whatsapp",
        content=urlencode(form),
        headers={"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature},
    )
    assert response.status_code == 405
    assert "<Response>" not in response.text
    samples = demo.samples()
    assert sum(value(samples, "wabot_ai_runs_total", outcome=o) or 0 for o in ("ok", "timeout", "error")) == 0


def test_metrics_port_listens_on_loopback_unless_configured(quiet_demo: DemoProcess, tmp_path: Path) -> None:
    # The webhook must be reachable by Twilio; the metrics (and /status) only by the local Prometheus.
    assert listening_on(quiet_demo.metrics_port) == {"127.0.0.1"}
    exposed = DemoProcess(tmp_path, env={"WABOT_METRICS_HOST": "0.0.0.0"}).wait_ready()
    try:
        assert listening_on(exposed.metrics_port) == {"0.0.0.0"}
    finally:
        exposed.stop()


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_two_workers_aggregate_through_the_multiprocess_dir(tmp_path: Path) -> None:
    multiproc_dir = tmp_path / "prometheus"
    multiproc_dir.mkdir()
    demo = DemoProcess(
        tmp_path, env={"WABOT_REPLY_TIMEOUT": "3", "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}, workers=2
    )
    try:
        demo.wait_ready()
        # /healthz answers once one worker is up
        both_up = lambda: demo.text().count("Application startup complete.") >= 2  # noqa: E731
        wait_until(both_up, 20, "both workers to start", details=demo.text)
        workers = sorted(int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", demo.text()))
        assert len(workers) == 2, demo.text()
        # Which worker accepts a connection is the kernel's choice, and one may take every burst. To have both
        # serve an exact share, each wave goes out while the other worker is paused (SIGSTOP, well inside
        # uvicorn's 5 s health check), on fresh connections so no kept-alive one leads to the paused worker.
        per_wave, n = 12, 0
        for paused in workers:
            demo.client.close()
            demo.client = httpx2.Client(timeout=30.0, verify=CLIENT_TLS)
            os.kill(paused, signal.SIGSTOP)
            try:
                wave = [
                    (f"message {n + i} [sim:delay=0.05] [sim:echo]", f"+15557651{n + i:03d}") for i in range(per_wave)
                ]
                assert demo.send_all(wave) == [[f"[turn 1] message {n + i}"] for i in range(per_wave)]
            finally:
                os.kill(paused, signal.SIGCONT)
            n += per_wave
            demo.client.close()
            demo.client = httpx2.Client(timeout=30.0, verify=CLIENT_TLS)

        # Each worker's own count, from its file in the multiprocess directory...
        per_worker = {}
        for pid in workers:
            merged = multiprocess.MultiProcessCollector.merge([str(multiproc_dir / f"counter_{pid}.db")])
            per_worker[pid] = sum(s.value for m in merged for s in m.samples if s.name == "wabot_ai_runs_total")
        assert per_worker == {workers[0]: per_wave, workers[1]: per_wave}

        # ...and the scrape sums them.
        samples = demo.samples()
        assert value(samples, "wabot_ai_runs_total", outcome="ok") == n == 24
        assert value(samples, "wabot_ai_runs_total", outcome="timeout") == 0
        assert value(samples, "wabot_ai_runs_total", outcome="error") == 0
        assert value(samples, "wabot_response_seconds_count") == n
        assert value(samples, "wabot_response_seconds_bucket", le="+Inf") == n
        assert value(samples, "wabot_model_calls_total", outcome="ok") == n
        # Static gauges are not summed over the workers.
        assert value(samples, "wabot_build_info", version="0.1.0") == 1.0
        assert value(samples, "wabot_reply_timeout_seconds") == 3.0
        # Exemplars are off in multiprocess mode, even for an OpenMetrics scraper.
        assert "trace_id" not in demo.scrape("application/openmetrics-text").text
    finally:
        demo.stop()


def test_exemplars_link_only_to_traces_that_were_sampled(make_bot, sim, log_lines) -> None:
    """An exemplar is a link to a trace: one that the sampler dropped would lead to "trace not found"."""

    def exemplar_trace_ids() -> set[str]:
        text, _ = exposition("application/openmetrics-text")
        return set(re.findall(r'# \{trace_id="([0-9a-f]{32})"\}', text.decode()))

    def send(bot, body: str) -> str:
        mark = log_lines.mark()
        form = bot.form(body, sender="+15557650012")
        assert bot.post_form(form).messages == [f"[turn 1] {body}"]
        [total] = [
            e for e in log_lines.events(mark) if e["event"] == "total_time" and e["message_sid"] == form["MessageSid"]
        ]
        return total["trace_id"]

    sampled = send(make_bot(reply_timeout=3.0), "sampled")
    assert sampled in exemplar_trace_ids()
    dropped = send(make_bot(reply_timeout=3.0, otel_traces_sampler="always_off"), "not sampled")
    assert re.fullmatch(r"[0-9a-f]{32}", dropped)  # the logs still correlate the request's lines
    assert dropped not in exemplar_trace_ids()
