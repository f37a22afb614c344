"""End to end: the bot, a real Prometheus and a real Alertmanager on 127.0.0.1, driven by signed webhook traffic.

`wabot serve --demo` answers through its OpenAI simulator; every message carries a `[sim:...]` directive that fixes
its fate (fast answer, slow answer = holding reply + follow-up, model error = inline apology, tool call), so the
share of each outcome is exactly what the test chose. Prometheus (Debian's `prometheus`) scrapes the bot every
second and evaluates every half second a test copy of the rules generated from alerts/generate.py with every `for:`
set to 1 s (windows, thresholds and traffic gates are the deployed ones); its config is generated from
deploy/prometheus.yml.
Alertmanager (Debian's `prometheus-alertmanager`) runs a test copy of alerts/alertmanager.yml made by
alerts/testing.py, whose receivers all post to a local webhook receiver.

Phase 1: 40 messages, 4 slow (10 %): the recording rules equal the traffic, the timeout-ratio alert stays silent
for several evaluations although the traffic gate is open. Phase 2: 10 more slow messages and 2 failing ones
(14 / 52 = 26.9 % timeouts): the timeout-ratio alert goes pending then firing with the exact value, `WabotAIErrors`
reaches the ticket receiver through Alertmanager, the delivery-SLO burn-rate alerts fire on the windows the error
ratio crosses. Every dashboard query returns data. Phase 3 (spend, issue 15): one user is driven past
WABOT_USER_DAILY_TOKENS (one notice, then empty replies, no model call) and a burst of long answers past
WABOT_MAX_REPLY_PARTS (4 parts, the last with the shortened marker); the counters equal the traffic,
WabotSpendBurnRateHigh (both rows), WabotBudgetRefusalsHigh and WabotAnswersShortenedOften fire, and the spend row's
dashboard queries return the numbers. Missing binaries fail the test; they never skip it.

The reply deadline is 2.5 s: the OpenAI SDK retries a 500 twice with 0.375-1.5 s of backoff in all, so with a 1 s
deadline a model error could only surface after the holding reply (a timeout plus a `followup`-phase error), never
as the inline apology this test injects.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from xml.etree import ElementTree

import httpx2
import pytest
import yaml
from twilio.request_validator import RequestValidator

from alerts import generate as rules_generator
from alerts import testing
from bot.demo.inbound_form import inbound_form
from bot.demo.runner import DEMO_ACCOUNT_SID, DEMO_FROM
from bot.settings import DEFAULT_APOLOGY_MESSAGE, DEFAULT_BUDGET_MESSAGE, DEFAULT_HOLDING_MESSAGE
from bot.splitting import SHORTENED_MARKER
from dashboards import generate as dashboards
from telemetry.thresholds import THRESHOLDS, duration_seconds, seconds_name
from tests.binaries import find_binary
from tests.conftest import CLIENT_TLS, free_port
from tests.forkserver import Forked, spawn_bot
from tests.served import DEMO_AUTH_TOKEN
from tests.waiting import wait_until

# One worker runs the whole module under `--dist loadgroup`: spread over several, each would start its own bot,
# Prometheus and Alertmanager and send every phase's traffic again for the tests it got.
pytestmark = [pytest.mark.slow, pytest.mark.prometheus, pytest.mark.xdist_group("end_to_end_alerts")]

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "alerts" / "wabot.rules.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus.yml"
JOB = THRESHOLDS.job
W = THRESHOLDS.alerts.window  # the operational rules' window: every phase's traffic fits in it
SLOW_RECORD = f"wabot:response_over_{seconds_name(THRESHOLDS.total_time.slow_s)}:ratio_rate{W}"
LIMIT_RECORD = f"wabot:response_over_{seconds_name(THRESHOLDS.total_time.twilio_limit_s)}:ratio_rate{W}"
REPLY_SLO = f"wabot:slo_reply_{seconds_name(THRESHOLDS.total_time.twilio_limit_s)}"

REPLY_TIMEOUT_S = 2.5
FOLLOWUP_TIMEOUT_S = 5.0
FOR_OVERRIDE = "1s"
SCRAPE_INTERVAL_S = 1.0  # also the scrape timeout: a scrape of the busy bot on a loaded machine must fit in it
# Rules are evaluated twice per scrape: a phase is observed SETTLED_EVALUATIONS evaluations after its last scrape.
EVALUATION_INTERVAL_S = 0.5
SETTLE_TIMEOUT_S = 20.0
NOTIFY_TIMEOUT_S = 20.0
SETTLED_EVALUATIONS = 3  # rule evaluations on settled data before a phase counts as observed

FAST = "[sim:delay=0.05] [sim:echo]"  # answered within the deadline with the echo "[turn 1] <text>"
SLOW = f"[sim:delay={REPLY_TIMEOUT_S + 0.5:g}]"  # past the deadline, well within the follow-up budget
FAIL = "[sim:error=500]"
TOOL = FAST + ' [sim:tool=calculate:{"expression":"6*7"}]'
TOOL_ANSWER = 'Tool calculate said: {"expression": "6*7", "result": 42}'
QUICK_AT_ONCE = 6  # messages answered within the deadline, sent this many at a time (Stack.drive)
HOLDING = [DEFAULT_HOLDING_MESSAGE]
APOLOGY = [DEFAULT_APOLOGY_MESSAGE]


@dataclass(frozen=True)
class Traffic:
    ok: int = 0
    tool: int = 0
    slow: int = 0
    error: int = 0

    @property
    def total(self) -> int:
        return self.ok + self.tool + self.slow + self.error


PHASE1 = Traffic(ok=35, tool=1, slow=4)  # 10 % timeouts: below the 20 % threshold, above the 10-message gate
PHASE2 = Traffic(slow=10, error=2)
TOTAL = Traffic(ok=35, tool=1, slow=14, error=2)  # 14 / 52 = 26.9 % timeouts, 2 / 52 = 3.8 % errors
# Spend (phase 3): only output tokens are priced, at 100 USD per million, against a 4 USD daily budget. Phases 1 and 2
# spend cents (short answers); phase 3's long answers (about 3,600 words = tokens each) spend dollars, on pace for far
# more than the budget in a day on every window of WabotSpendBurnRateHigh.
OUTPUT_USD_PER_MILLION = 100.0
BUDGET_USD = 4.0
USER_DAILY_TOKENS = 6000
MAX_OUTPUT_TOKENS = 4000
LONG = "[sim:delay=0.05] [sim:long=20000]"  # 20,000 characters: 13 WhatsApp parts, cut to 4
LONG_ANSWERS = 8  # one each from as many senders, at once
REFUSED_AFTER_NOTICE = 12  # the budget user's messages after the notice: empty replies
# The traffic is built around the thresholds (telemetry/thresholds.py): phase 1 below the timeout line with the
# gate open, both phases together above it.
assert PHASE1.total >= THRESHOLDS.alerts.min_messages
assert PHASE1.slow / PHASE1.total < THRESHOLDS.alerts.timeout_ratio < TOTAL.slow / TOTAL.total


# ---------------------------------------------------------------------------------------------------- processes


class Process:
    """A subprocess in its own session with its output in a file; stopped by SIGTERM, then SIGKILL."""

    def __init__(self, name: str, command: list[str], log: Path, **kwargs: Any) -> None:
        self.name, self.log = name, log
        self.popen: subprocess.Popen[bytes] | Forked
        if command[:3] == [sys.executable, "-m", "bot"]:  # forked where the libraries are imported already
            self.popen = spawn_bot(command[3:], cwd=kwargs["cwd"], env=kwargs["env"], output=log)
            return
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
            )

    def stop(self) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=5)

    def tail(self, chars: int = 3000) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ({self.log}) ---\n{text[-chars:]}"

    def wait_ready(self, url: str, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.popen.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            try:
                return httpx2.get(url, timeout=1.0, verify=CLIENT_TLS).status_code == 200
            except httpx2.HTTPError:
                return False

        wait_until(ready, timeout, f"{self.name} ready at {url}", details=self.tail)


class Prometheus:
    """The HTTP API of the Prometheus under test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx2.Client(base_url=url, timeout=10.0, verify=CLIENT_TLS)

    def _get(self, path: str, **params: str) -> Any:
        response = self.client.get(path, params=params)
        body = response.json()
        assert response.status_code == 200 and body.get("status") == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        """Instant query: {"resultType": ..., "result": ...}."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self._get("/api/v1/query", **params)

    def vector(self, expr: str, at: float | None = None) -> list[tuple[dict[str, str], float]]:
        data = self.query(expr, at)
        assert data["resultType"] == "vector", (expr, data)
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def scalar(self, expr: str, at: float | None = None) -> float | None:
        """The value of a one-element vector, None when it is empty."""
        result = self.vector(expr, at)
        assert len(result) <= 1, (expr, result)
        return result[0][1] if result else None

    def samples(self, selector: str, window: str, at: float) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
        """The raw samples of `selector[window]` at time `at`: (labels, [(timestamp, value), ...]) per series."""
        data = self.query(f"{selector}[{window}]", at)
        assert data["resultType"] == "matrix", data
        return [(r["metric"], [(float(t), float(v)) for t, v in r["values"]]) for r in data["result"]]

    def alerts(self, name: str | None = None) -> list[dict[str, Any]]:
        alerts = self._get("/api/v1/alerts")["alerts"]
        return [a for a in alerts if name is None or a["labels"]["alertname"] == name]

    def rule_groups(self) -> list[dict[str, Any]]:
        return self._get("/api/v1/rules")["groups"]


@dataclass
class Stack:
    bot_url: str
    prometheus: Prometheus
    alertmanager_url: str
    receiver: Any  # alerts.testing.LocalReceiver
    rules_copy: Path
    started: float  # wall-clock time before Prometheus started
    processes: list[Process] = field(default_factory=list)
    # Idle connections dropped after 2 s, well before uvicorn closes them (5 s): a webhook sent on a kept-alive
    # connection the bot is closing at that moment comes back as "Server disconnected without sending a response".
    http: httpx2.Client = field(
        default_factory=lambda: httpx2.Client(
            timeout=30.0, limits=httpx2.Limits(keepalive_expiry=2.0), verify=CLIENT_TLS
        )
    )

    def diagnostics(self) -> str:
        return "\n".join(p.tail() for p in self.processes)

    def poll(self, what: str, probe: Callable[[], tuple[bool, Any]], timeout: float = SETTLE_TIMEOUT_S) -> Any:
        """Call `probe` until it reports done; fail with its last observation (and the logs) after `timeout`."""
        last: list[Any] = [None]

        def done() -> bool:
            finished, last[0] = probe()
            return finished

        wait_until(done, timeout, what, 0.1, details=lambda: f"last observed: {last[0]!r}\n{self.diagnostics()}")
        return last[0]

    # -- traffic

    def form(self, body: str, sender: str) -> dict[str, str]:
        return inbound_form(body, sender=sender, to=DEMO_FROM, account_sid=DEMO_ACCOUNT_SID, profile_name="e2e")

    def send(self, body: str, sender: str) -> list[str]:
        """Post one message signed exactly as Twilio (and `wabot send`) signs it; the TwiML reply's messages."""
        url = f"{self.bot_url}/whatsapp"
        form = self.form(body, sender)
        signature = RequestValidator(DEMO_AUTH_TOKEN).compute_signature(url, form)
        headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature}
        response = self.http.post(url, content=urlencode(form), headers=headers)
        assert response.status_code == 200, (body, response.status_code, response.text)
        return [m.text or "" for m in ElementTree.fromstring(response.text).iter("Message")]

    def drive(self, phase: int, traffic: Traffic) -> None:
        """Send `traffic`, one sender per message; every reply is the one its directive fixes.

        The quick messages go first, QUICK_AT_ONCE at a time, then the slow ones all at once: they time out after
        every quick one was counted, so the timeout ratio never passes through a higher value on its way to the
        injected one. Forty at once made every quick answer wait for the other thirty-nine on a bot starved by a
        loaded `make test` (2 s each, some past the 2.5 s deadline); a few at a time each waits for a few."""
        quick: list[tuple[str, list[str]]] = []
        for i in range(traffic.ok):
            quick.append((f"p{phase} ok {i} {FAST}", [f"[turn 1] p{phase} ok {i}"]))
        for i in range(traffic.tool):
            quick.append((f"p{phase} six times seven {i} {TOOL}", [TOOL_ANSWER]))
        for i in range(traffic.error):
            quick.append((f"p{phase} broken {i} {FAIL}", APOLOGY))
        slow = [(f"p{phase} slow {i} {SLOW}", HOLDING) for i in range(traffic.slow)]
        senders = [f"+1555{phase:02d}{i:05d}" for i in range(traffic.total)]
        for messages, at_once, first in ((quick, QUICK_AT_ONCE, 0), (slow, len(slow), len(quick))):
            if not messages:
                continue
            with concurrent.futures.ThreadPoolExecutor(max_workers=at_once) as pool:
                replies = list(pool.map(self.send, [body for body, _ in messages], senders[first:]))
            assert replies == [expected for _, expected in messages]


# ---------------------------------------------------------------------------------------------------- fixtures


def _duration(seconds: float) -> str:
    """A Prometheus duration (whole units only: 0.5 s is 500ms)."""
    return f"{round(seconds * 1000)}ms"


def prometheus_test_config(rules: Path, targets: Path, alertmanager_port: int) -> dict[str, Any]:
    """deploy/prometheus.yml with the test's intervals, the test rules copy, the test Alertmanager and only the bot's
    job, whose target is read from `targets` (file-based discovery: it exists once the bot is ready)."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    assert any(Path(f).name == RULES.name for f in config["rule_files"]), config["rule_files"]
    [job] = [c for c in config["scrape_configs"] if c["job_name"] == JOB]
    del job["static_configs"]
    # Re-read every second too, should the file system not report the change (inotify).
    job["file_sd_configs"] = [{"files": [str(targets)], "refresh_interval": _duration(SCRAPE_INTERVAL_S)}]
    config["scrape_configs"] = [job]  # the other jobs' targets (collector, Tempo, ...) do not exist here
    scrape, evaluation = _duration(SCRAPE_INTERVAL_S), _duration(EVALUATION_INTERVAL_S)
    config["global"].update(scrape_interval=scrape, scrape_timeout=scrape, evaluation_interval=evaluation)
    config["rule_files"] = [str(rules)]
    [alertmanagers] = config["alerting"]["alertmanagers"]
    alertmanagers["static_configs"] = [{"targets": [f"127.0.0.1:{alertmanager_port}"]}]
    return config


def _free_ports(count: int) -> list[int]:
    """`count` different free ports: they are all picked before any server binds one."""
    ports: list[int] = []
    for _ in range(10 * count):
        if (port := free_port()) not in ports:
            ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"no {count} different free ports: {ports}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus_bin = find_binary("prometheus", "prometheus", "/usr/bin/prometheus")
    alertmanager_bin = find_binary(
        "prometheus-alertmanager", "alertmanager", "prometheus-alertmanager", "/usr/bin/prometheus-alertmanager"
    )
    work = tmp_path_factory.mktemp("e2e")
    receiver = testing.LocalReceiver().start()
    processes: list[Process] = []
    s: Stack | None = None
    # The three start side by side, as each takes seconds: the bot its imports (and the fork server's, the first
    # time), Prometheus its service discovery, which hands targets to the scrape manager on 5 s ticks. Prometheus
    # learns the bot's metrics target only once the bot is ready, so its first scrape finds every series the bot
    # creates, at 0 (a series that appeared a scrape later would be extrapolated differently: ratios would be off).
    spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        port, metrics_port, alertmanager_port, prometheus_port = _free_ports(4)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "WABOT_", "PROMETHEUS_", "TWILIO_"))},
            "WABOT_REPLY_TIMEOUT": f"{REPLY_TIMEOUT_S:g}",
            "WABOT_FOLLOWUP_TIMEOUT": f"{FOLLOWUP_TIMEOUT_S:g}",
            "WABOT_STORE": f"sqlite:///{work}/e2e.db",
            "TWILIO_AUTH_TOKEN": DEMO_AUTH_TOKEN,  # the demo signs with it (a token of its own per run otherwise)
            "OTEL_TRACES_EXPORTER": "none",
            "PYTHONUNBUFFERED": "1",
            "WABOT_PRICES": f"gpt-4.1-mini=0/0/{OUTPUT_USD_PER_MILLION:g}",
            "WABOT_DAILY_BUDGET_USD": f"{BUDGET_USD:g}",
            "WABOT_USER_DAILY_TOKENS": str(USER_DAILY_TOKENS),
            "WABOT_MAX_OUTPUT_TOKENS": str(MAX_OUTPUT_TOKENS),
        }
        env.pop("OPENAI_API_KEY", None)
        command = [sys.executable, "-m", "bot", "serve", "--demo", "--host", "127.0.0.1"]
        command += ["--port", str(port), "--metrics-port", str(metrics_port)]

        def start_bot() -> Process:
            bot = Process("wabot", command, work / "wabot.log", cwd=ROOT, env=env)
            processes.append(bot)
            return bot

        spawned = spawner.submit(start_bot)

        am_config = work / "alertmanager.yml"
        am_config.write_text(
            yaml.safe_dump(testing.alertmanager_test_config(testing.ALERTMANAGER_CONFIG, receiver.url)),
            encoding="utf-8",
        )
        alertmanager = Process(
            "alertmanager",
            [
                alertmanager_bin,
                f"--config.file={am_config}",
                f"--storage.path={work / 'alertmanager-data'}",
                f"--web.listen-address=127.0.0.1:{alertmanager_port}",
                "--cluster.listen-address=",
                "--log.level=debug",
            ],
            work / "alertmanager.log",
        )
        processes.append(alertmanager)

        rules_copy = work / "wabot.rules.test.yml"
        # `alerts/generate.py --for-override` run in this process (tests/test_alert_rules.py runs the script itself).
        assert rules_generator.main(["--for-override", FOR_OVERRIDE, "--out", str(rules_copy)]) == 0

        targets = work / "targets.json"
        prom_config = work / "prometheus.yml"
        prom_config.write_text(
            yaml.safe_dump(prometheus_test_config(rules_copy, targets, alertmanager_port)), encoding="utf-8"
        )
        started = time.time()
        prometheus = Process(
            "prometheus",
            [
                prometheus_bin,
                f"--config.file={prom_config}",
                f"--storage.tsdb.path={work / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
                f"--web.external-url=http://127.0.0.1:{prometheus_port}",
                # Firing alerts are re-sent every resend delay (default 1m); ones evaluated before the notifier
                # knew the Alertmanager (the Watchdog fires at the first evaluation) would wait for it.
                f"--rules.alert.resend-delay={_duration(EVALUATION_INTERVAL_S)}",
                "--enable-feature=exemplar-storage",
            ],
            work / "prometheus.log",
        )
        processes.append(prometheus)

        bot = spawned.result(timeout=60)
        bot.wait_ready(f"http://127.0.0.1:{port}/readyz")
        written = work / "targets.json.new"  # renamed into place: Prometheus never reads half a file
        written.write_text(json.dumps([{"targets": [f"127.0.0.1:{metrics_port}"]}]), encoding="utf-8")
        written.replace(targets)
        alertmanager.wait_ready(f"http://127.0.0.1:{alertmanager_port}/-/ready")
        prometheus.wait_ready(f"http://127.0.0.1:{prometheus_port}/-/ready")

        s = Stack(
            bot_url=f"http://127.0.0.1:{port}",
            prometheus=Prometheus(f"http://127.0.0.1:{prometheus_port}"),
            alertmanager_url=f"http://127.0.0.1:{alertmanager_port}",
            receiver=receiver,
            rules_copy=rules_copy,
            started=started,
            processes=processes,
        )

        def scraped() -> tuple[bool, Any]:
            runs = s.prometheus.vector(f'wabot_ai_runs_total{{job="{JOB}"}}')
            up = s.prometheus.scalar(f'up{{job="{JOB}"}}')
            return up == 1 and sorted(v for _, v in runs) == [0, 0, 0, 0], {"up": up, "runs": runs}

        s.poll("first scrape of the idle bot", scraped)
        yield s
    finally:
        spawner.shutdown()  # the bot is in `processes` once spawned
        for process in reversed(processes):
            process.stop()
        receiver.stop()
        if s is not None:
            s.http.close()
            s.prometheus.client.close()


@dataclass(frozen=True)
class Phase:
    settled: float  # wall-clock time at which Prometheus had scraped the phase's final counter values
    end: float  # later: every rule group has evaluated SETTLED_EVALUATIONS times on those values


def _settle(stack: Stack, expected: dict[str, float]) -> Phase:
    """Wait until Prometheus has scraped `expected` (PromQL -> value), then until every rule group has evaluated
    SETTLED_EVALUATIONS times after that."""
    prom = stack.prometheus

    def scraped() -> tuple[bool, Any]:
        values = {expr: prom.scalar(expr) for expr in expected}
        return values == expected, values

    stack.poll("the phase's counters in Prometheus", scraped)
    settled = time.time()

    # Each group's evaluations that started after `settled`, told apart by their start times. The poll comes every
    # 0.1 s, evaluations every EVALUATION_INTERVAL_S: one the poll did not see (a stalled test process) only makes
    # the wait longer.
    seen: dict[str, set[float]] = {}

    def evaluated() -> tuple[bool, Any]:
        for group in prom.rule_groups():
            start = datetime.fromisoformat(group["lastEvaluation"]).timestamp()
            seen.setdefault(group["name"], set()).update([start] if start >= settled else [])
        return min(len(starts) for starts in seen.values()) >= SETTLED_EVALUATIONS, seen

    stack.poll("rule evaluations on the settled counters", evaluated)
    return Phase(settled=settled, end=time.time())


def _expected_counters(traffic: Traffic) -> dict[str, float]:
    followups = traffic.slow  # one short follow-up message per holding reply
    return {
        f'sum(wabot_ai_runs_total{{job="{JOB}"}})': traffic.total,
        f'sum(wabot_ai_runs_total{{job="{JOB}",outcome="ok"}})': traffic.ok + traffic.tool,
        f'sum(wabot_ai_runs_total{{job="{JOB}",outcome="timeout"}})': traffic.slow,
        f'sum(wabot_ai_runs_total{{job="{JOB}",outcome="error"}})': traffic.error,
        f'sum(wabot_ai_errors_total{{job="{JOB}"}})': traffic.error,
        f'sum(wabot_ai_errors_total{{job="{JOB}",phase="inline",error_type="server_error"}})': traffic.error,
        f'sum(wabot_response_seconds_count{{job="{JOB}"}})': traffic.total,
        f'sum(wabot_followups_total{{job="{JOB}",outcome="delivered"}})': followups,
        f'sum(wabot_followups_total{{job="{JOB}",outcome="failed"}})': 0,
        f'sum(wabot_followups_pending{{job="{JOB}"}})': 0,
        f'sum(wabot_message_status_total{{job="{JOB}",status="sent"}})': followups,
        f'sum(wabot_message_status_total{{job="{JOB}",status="delivered",error_code=""}})': followups,
        f'sum(wabot_tool_calls_total{{job="{JOB}",tool="calculate",outcome="ok"}})': traffic.tool,
    }


@pytest.fixture(scope="module")
def phase1(stack: Stack) -> Phase:
    stack.drive(1, PHASE1)
    return _settle(stack, _expected_counters(PHASE1))


@pytest.fixture(scope="module")
def phase2(stack: Stack, phase1: Phase) -> Phase:
    stack.drive(2, PHASE2)
    return _settle(stack, _expected_counters(TOTAL))


# ---------------------------------------------------------------------------------------------------- helpers


def _recorded(stack: Stack, record: str, at: float, labels: str = "") -> tuple[float, float]:
    """(timestamp, value) of the last sample a recording rule wrote at or before `at` (one series)."""
    series = stack.prometheus.samples(f'{record}{{job="{JOB}"{labels}}}', "5s", at)
    assert len(series) == 1, (record, series)
    return series[0][1][-1]


def _close(actual: float | None, expected: float, tolerance: float = 1e-6) -> bool:
    return actual is not None and math.isclose(actual, expected, rel_tol=tolerance, abs_tol=tolerance)


def _assert_recording_rules(stack: Stack, phase: Phase, traffic: Traffic) -> None:
    """The recording rules at the end of a phase equal the cumulative traffic (all of it is inside 5 m)."""
    n, at = traffic.total, phase.end
    value = {
        f"wabot:ai_timeout:ratio_rate{W}": traffic.slow / n,
        f"wabot:ai_error:ratio_rate{W}": traffic.error / n,
        f"wabot:followup_delivery:ratio_rate{W}": 1.0,
        f"wabot:followups_failed:increase{W}": 0.0,
        SLOW_RECORD: 0.0,
        LIMIT_RECORD: 0.0,
    }
    for window in THRESHOLDS.slo.windows:
        value[f"{REPLY_SLO}:error_ratio_rate{window}"] = 0.0
        value[f"wabot:slo_answer_delivered:error_ratio_rate{window}"] = traffic.error / n
    wrong = {}
    for record, expected in value.items():
        ts, got = _recorded(stack, record, at)
        if ts < phase.settled or not _close(got, expected):
            wrong[record] = {"expected": expected, "got": got, "at": ts, "settled": phase.settled}
    assert not wrong, wrong

    # Increases and rates carry Prometheus' extrapolation over the window: never below what was sent, and only a
    # fraction of a scrape interval's worth above it. Their proportions are exact.
    ts, got = _recorded(stack, f"wabot:messages:increase{W}", at)
    assert n <= got < n * 1.25, (got, n)
    ts, rate = _recorded(stack, f"wabot:messages:rate{W}", at)
    seconds = duration_seconds(W)
    assert n / seconds <= rate < n * 1.25 / seconds, (rate, n)
    for outcome, count in (("ok", traffic.ok + traffic.tool), ("timeout", traffic.slow), ("error", traffic.error)):
        ts, got = _recorded(stack, f"wabot:ai_runs:rate{W}", at, f',outcome="{outcome}"')
        assert count / seconds <= got <= count * 1.25 / seconds, (outcome, got, count)

    # A counter series that appears within the window counts with its whole value; here all were pre-created.
    errors = stack.prometheus.vector(f'wabot:ai_errors:increase{W}{{job="{JOB}"}} > 0', at)
    labels = {"__name__": f"wabot:ai_errors:increase{W}", "job": JOB, "phase": "inline", "error_type": "server_error"}
    expected_errors = [(labels, traffic.error)]
    assert errors == ([] if traffic.error == 0 else expected_errors)

    # Quantiles of the webhook time: fast answers below the deadline, holding replies in the 2-4 s bucket.
    p50 = _recorded(stack, f"wabot:response_seconds:p50_{W}", at)[1]
    p95 = _recorded(stack, f"wabot:response_seconds:p95_{W}", at)[1]
    p99 = _recorded(stack, f"wabot:response_seconds:p99_{W}", at)[1]
    assert p50 < REPLY_TIMEOUT_S, p50
    assert 2 < p95 <= p99 <= 4, (p95, p99)


def _alert_rule(stack: Stack, name: str) -> list[dict[str, Any]]:
    return [
        r for g in stack.prometheus.rule_groups() for r in g["rules"] if r["type"] == "alerting" and r["name"] == name
    ]


def _rules_by_name() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def _wait_notification(stack: Stack, receiver: str, alertname: str) -> Any:
    try:
        return stack.receiver.wait_for(
            lambda n: n.receiver == receiver and alertname in n.alertnames and n.payload.get("status") == "firing",
            NOTIFY_TIMEOUT_S,
        )
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{stack.diagnostics()}")


def _receivers_of(stack: Stack, alertname: str) -> set[str]:
    return {n.receiver for n in stack.receiver.received() if alertname in n.alertnames}


# ---------------------------------------------------------------------------------------------------- tests


def test_prometheus_runs_the_test_copy_of_the_real_rules(stack: Stack) -> None:
    """Same groups, rules, expressions, labels and annotations as alerts/wabot.rules.yml; only `for:` differs."""
    real = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    copy = yaml.safe_load(stack.rules_copy.read_text(encoding="utf-8"))
    for group in real["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = FOR_OVERRIDE
    assert copy == real

    loaded = stack.prometheus.rule_groups()
    assert sorted(g["name"] for g in loaded) == sorted(g["name"] for g in real["groups"])
    for group in loaded:
        assert group["file"] == str(stack.rules_copy)
        assert group["interval"] == EVALUATION_INTERVAL_S
    alerting = [r for g in loaded for r in g["rules"] if r["type"] == "alerting"]
    assert {r["duration"] for r in alerting if r["name"] != "Watchdog"} == {1}
    am = stack.prometheus._get("/api/v1/alertmanagers")["activeAlertmanagers"]
    assert [a["url"] for a in am] == [f"{stack.alertmanager_url}/api/v2/alerts"]


def test_phase1_recording_rules_equal_the_traffic(stack: Stack, phase1: Phase) -> None:
    _assert_recording_rules(stack, phase1, PHASE1)


def test_timeout_alert_stays_silent_below_its_line(stack: Stack, phase1: Phase) -> None:
    prom = stack.prometheus
    # The traffic gate is open (40 >= 10 messages): the alert is silent because of the ratio alone.
    assert prom.scalar(f'wabot:messages:increase{W}{{job="{JOB}"}}', phase1.end) >= THRESHOLDS.alerts.min_messages
    assert _close(prom.scalar(f'wabot:ai_timeout:ratio_rate{W}{{job="{JOB}"}}', phase1.end), 0.1)
    # Never pending or firing from Prometheus' start until SETTLED_EVALUATIONS evaluations on the settled ratio.
    history = math.ceil(phase1.end - stack.started) + 1
    alerts = prom.query(f'ALERTS{{alertname="WabotAITimeoutRatioHigh"}}[{history}s]', phase1.end)
    assert alerts["result"] == [], alerts
    [rule] = _alert_rule(stack, "WabotAITimeoutRatioHigh")
    assert rule["health"] == "ok", rule


def test_phase2_recording_rules_equal_the_traffic(stack: Stack, phase2: Phase) -> None:
    _assert_recording_rules(stack, phase2, TOTAL)


def test_timeout_alert_goes_pending_then_fires_above_its_line(stack: Stack, phase2: Phase) -> None:
    ratio = TOTAL.slow / TOTAL.total
    expected_description = f"{ratio * 100:.4g}%"  # Prometheus' humanizePercentage: %.4g of the percentage
    real = _rules_by_name()["WabotAITimeoutRatioHigh"]

    def active() -> tuple[bool, Any]:
        alerts = stack.prometheus.alerts("WabotAITimeoutRatioHigh")
        done = len(alerts) == 1 and alerts[0]["state"] in ("pending", "firing")
        return done and expected_description in alerts[0]["annotations"]["description"], alerts

    [alert] = stack.poll("WabotAITimeoutRatioHigh pending or firing at the injected ratio", active)
    assert alert["labels"] == {"alertname": "WabotAITimeoutRatioHigh", "job": JOB, "severity": "warning"}
    assert _close(float(alert["value"]), ratio), alert
    annotations = alert["annotations"]
    assert annotations["summary"] == real["annotations"]["summary"]
    assert annotations["runbook_url"].endswith("/alerts/runbooks/WabotAITimeoutRatioHigh.md")
    assert annotations["description"] == (
        f"{expected_description} of the messages to {JOB} in the last {W} got a holding reply instead of an inline "
        f"answer (threshold {THRESHOLDS.alerts.timeout_ratio * 100:g} %, at least {THRESHOLDS.alerts.min_messages} "
        "messages)."
    )
    # It went through `pending` (the 1 s `for:` of the test copy) before firing.
    history = math.ceil(time.time() - stack.started) + 1
    states = {
        labels["alertstate"]
        for labels, _ in stack.prometheus.vector(
            f'max_over_time(ALERTS{{alertname="WabotAITimeoutRatioHigh"}}[{history}s])'
        )
    }
    assert "pending" in states, states
    # Through Alertmanager: a warning, so the ticket receiver.
    note = _wait_notification(stack, "ticket", "WabotAITimeoutRatioHigh")
    assert note.payload["groupLabels"] == {"alertname": "WabotAITimeoutRatioHigh", "job": JOB}
    assert _receivers_of(stack, "WabotAITimeoutRatioHigh") == {"ticket"}


def test_ai_errors_fire_and_reach_the_ticket_receiver(stack: Stack, phase2: Phase) -> None:
    labels = {
        "alertname": "WabotAIErrors",
        "job": JOB,
        "phase": "inline",
        "error_type": "server_error",
        "severity": "warning",
    }
    description = (
        f"AI runs of {JOB} that ended without an answer in the last {W}: {{}} (error type server_error, inline "
        "phase); each of those users got an apology. Log event: ai_error_in_timeout."
    )

    def firing() -> tuple[bool, Any]:
        alerts = stack.prometheus.alerts("WabotAIErrors")
        return [a["state"] for a in alerts] == ["firing"] and alerts[0]["value"] is not None, alerts

    [alert] = stack.poll("WabotAIErrors firing", firing)
    assert alert["labels"] == labels
    assert float(alert["value"]) == TOTAL.error
    assert alert["annotations"]["description"] == description.format(TOTAL.error)
    assert alert["annotations"]["runbook_url"].endswith("/alerts/runbooks/WabotAIErrors.md")

    note = _wait_notification(stack, "ticket", "WabotAIErrors")
    assert note.payload["receiver"] == "ticket"
    assert note.payload["groupLabels"] == {"alertname": "WabotAIErrors", "job": JOB}
    [sent] = note.alerts
    assert sent["status"] == "firing"
    assert sent["labels"] == labels
    # Prometheus sent it as soon as it fired: the two errors may have been scraped one at a time.
    match = re.fullmatch(re.escape(description).replace(r"\{\}", r"(\d+)"), sent["annotations"]["description"])
    assert match and 1 <= int(match.group(1)) <= TOTAL.error, sent["annotations"]
    assert sent["annotations"]["runbook_url"] == alert["annotations"]["runbook_url"]
    assert sent["generatorURL"].startswith(stack.prometheus.url)
    assert _receivers_of(stack, "WabotAIErrors") == {"ticket"}


def test_delivery_slo_burn_rate_alerts_fire_on_the_windows_the_error_ratio_crosses(stack: Stack, phase2: Phase) -> None:
    """2 failed answers in 52 = 3.85 % of a 0.5 % budget: above 6x (3 %), 3x and 1x, below 14.4x (7.2 %)."""
    ratio = TOTAL.error / TOTAL.total
    budget = 1 - THRESHOLDS.slo.delivered_target
    expected = {(b.severity, b.long, b.short) for b in THRESHOLDS.slo.burn_rates if ratio > b.factor * budget}
    # The traffic's premise: some rows crossed, not all (the fastest page stays silent).
    assert expected == {("critical", "6h", "30m"), ("warning", "1d", "2h"), ("warning", "3d", "6h")}

    def active() -> tuple[bool, Any]:
        alerts = stack.prometheus.alerts("WabotDeliverySLOBurnRateHigh")
        windows = {(a["labels"]["severity"], a["labels"]["long_window"], a["labels"]["short_window"]) for a in alerts}
        return windows == expected and all(a["state"] == "firing" for a in alerts), alerts

    alerts = stack.poll("WabotDeliverySLOBurnRateHigh on exactly the crossed windows", active)
    for alert in alerts:
        assert _close(float(alert["value"]), ratio), alert
        assert f"{ratio * 100:.4g}%" in alert["annotations"]["description"]
    assert stack.prometheus.alerts("WabotReplySLOBurnRateHigh") == []
    # The critical one pages (its warnings are inhibited in Alertmanager, tests/test_alertmanager.py).
    note = _wait_notification(stack, "page", "WabotDeliverySLOBurnRateHigh")
    assert {a["labels"]["severity"] for a in note.alerts} == {"critical"}


def test_no_other_alert_is_active(stack: Stack, phase2: Phase) -> None:
    expected = {"Watchdog", "WabotAITimeoutRatioHigh", "WabotAIErrors", "WabotDeliverySLOBurnRateHigh"}

    def only_expected() -> tuple[bool, Any]:
        active = {a["labels"]["alertname"] for a in stack.prometheus.alerts()}
        return active == expected, active

    stack.poll("exactly the expected alerts active", only_expected)


def test_watchdog_reaches_the_deadmansswitch_only(stack: Stack) -> None:
    note = _wait_notification(stack, "deadmansswitch", "Watchdog")
    [alert] = note.alerts
    assert alert["labels"] == {"alertname": "Watchdog", "severity": "none"}
    assert alert["annotations"]["runbook_url"].endswith("/alerts/runbooks/Watchdog.md")
    assert _receivers_of(stack, "Watchdog") == {"deadmansswitch"}


def test_every_rule_evaluates_without_error(stack: Stack, phase2: Phase) -> None:
    broken = [
        (g["name"], r["name"], r.get("lastError"))
        for g in stack.prometheus.rule_groups()
        for r in g["rules"]
        if r["health"] != "ok"
    ]
    assert broken == []


def _unobserved_quantile(stack: Stack, expr: str) -> bool:
    """True when `expr` reads quantile rules (wabot:<histogram>:pNN_<window>) of histograms with no observation at
    all: those rules are absent then (a p95 of 0 s would be a lie), so no data is the right answer. The test's
    traffic has no attachments; tests/test_dashboards.py evaluates those panels with some."""
    histograms = re.findall(r"wabot:(\w+_seconds):p\d+_\w+", expr)
    return bool(histograms) and all(
        stack.prometheus.vector(f'sum(wabot_{name}_count{{job="{JOB}"}})') == [({}, 0.0)] for name in histograms
    )


def test_every_dashboard_query_returns_data(stack: Stack, phase2: Phase) -> None:
    queries = dashboards.panel_queries()
    assert queries
    empty, not_finite = [], []
    for title, expr in queries:
        data = stack.prometheus.query(expr)
        if data["resultType"] == "scalar":
            values = [float(data["result"][1])]
        else:
            assert data["resultType"] == "vector", (title, expr, data)
            values = [float(r["value"][1]) for r in data["result"]]
        if not values and not _unobserved_quantile(stack, expr):
            empty.append((title, expr))
        elif not all(math.isfinite(v) for v in values):
            not_finite.append((title, expr, values))
    assert empty == [], f"dashboard queries without data: {json.dumps(empty, indent=1)}"
    assert not_finite == [], f"dashboard queries with NaN/Inf: {not_finite}"


def test_dashboard_exemplars_link_to_traces(stack: Stack, phase2: Phase) -> None:
    """Prometheus (with exemplar storage, as deployed) keeps the bot's trace ids for the exemplar-enabled panels."""
    targets = [
        (title, dashboards.substitute(t["expr"]))
        for title, t in dashboards.iter_targets(dashboards.dashboard_json())
        if t.get("exemplar")
    ]
    assert targets
    missing = []
    for title, expr in targets:
        params = {"query": expr, "start": f"{stack.started:.3f}", "end": f"{time.time():.3f}"}
        data = stack.prometheus._get("/api/v1/query_exemplars", **params)
        trace_ids = [e["labels"].get("trace_id", "") for series in data for e in series["exemplars"]]
        if not trace_ids or not all(re.fullmatch(r"[0-9a-f]{32}", t) for t in trace_ids):
            missing.append((title, expr, trace_ids))
    assert missing == []


# ---------------------------------------------------------------------------------------------------- phase 3: spend


@dataclass(frozen=True)
class SpendPhase:
    settled: float
    answered: int  # the budget user's long answers before the notice
    refused: int  # their messages refused: the notice, then empty replies
    long_answers: int  # every long answer (the budget user's and the burst's), each cut at 4 parts
    cost_before: float  # USD spent by phases 1 and 2


def _cost(stack: Stack) -> float:
    return stack.prometheus.scalar(f'sum(wabot_cost_usd_total{{job="{JOB}"}})') or 0.0


@pytest.fixture(scope="module")
def spend_phase(stack: Stack, phase2: Phase) -> SpendPhase:
    # Phases 1 and 2 stayed under every spend row: the alert's silence there is test_no_other_alert_is_active's.
    cost_before = _cost(stack)
    fast = min(b for b in THRESHOLDS.spend.burn_rates if b.severity == "critical")
    assert cost_before * 86400 / duration_seconds(fast.long) < fast.factor * BUDGET_USD / 2, cost_before

    # One user past the daily token budget: answered (4 parts, cut) until the count passes it, then one notice.
    user = "+15559000001"
    answered = 0
    for n in range(5):
        parts = stack.send(f"budget {n} {LONG}", user)
        if parts == [DEFAULT_BUDGET_MESSAGE]:
            break
        assert len(parts) == 4 and parts[-1].endswith(SHORTENED_MARKER.strip()), parts
        answered += 1
    else:
        pytest.fail(f"never refused after {answered} long answers")
    assert answered >= 1
    # The rest of the day: empty replies.
    for n in range(REFUSED_AFTER_NOTICE):
        assert stack.send(f"refused {n} {LONG}", user) == []

    # A burst of long answers from other users: each cut at the parts cap, with the marker.
    senders = [f"+155591{i:05d}" for i in range(LONG_ANSWERS)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=LONG_ANSWERS) as pool:
        replies = list(pool.map(stack.send, [f"long {i} {LONG}" for i in range(LONG_ANSWERS)], senders))
    for parts in replies:
        assert len(parts) == 4 and parts[-1].endswith(SHORTENED_MARKER.strip()), parts
        assert parts[0].startswith("Sentence 1 of the long answer.")

    refused = 1 + REFUSED_AFTER_NOTICE
    long_answers = answered + LONG_ANSWERS
    runs = TOTAL.total + long_answers
    expected = {
        f'sum(wabot_budget_refusals_total{{job="{JOB}"}})': refused,
        f'sum(wabot_answers_shortened_total{{job="{JOB}"}})': long_answers,
        f'sum(wabot_ai_runs_total{{job="{JOB}"}})': runs,  # refused messages start no run
        f'max(wabot_daily_budget_usd{{job="{JOB}"}})': BUDGET_USD,
    }
    phase = _settle(stack, expected)
    return SpendPhase(phase.settled, answered, refused, long_answers, cost_before)


def test_spend_counters_equal_the_traffic(stack: Stack, spend_phase: SpendPhase) -> None:
    prom = stack.prometheus
    output = prom.scalar(f'sum(wabot_tokens_total{{job="{JOB}",direction="output",model="gpt-4.1-mini"}})')
    assert output is not None and output >= spend_phase.long_answers * 3000
    # The cost is the priced tokens at the table's price; nothing of this model is unpriced.
    assert _close(_cost(stack), output * OUTPUT_USD_PER_MILLION / 1e6, 1e-9)
    assert prom.scalar(f'sum(wabot_tokens_total{{job="{JOB}",model="other"}})') in (None, 0.0)
    # Each long answer took the 4 parts of the cap, no more.
    parts = prom.scalar(f'sum(wabot_reply_parts_total{{job="{JOB}"}})')
    assert parts is not None and parts >= 4 * spend_phase.long_answers
    # The budget user's answers are the conversation's turns; refused messages never reached the model.
    assert prom.scalar(f'sum(wabot_model_calls_total{{job="{JOB}",outcome="ok"}})') == (
        TOTAL.ok + 2 * TOTAL.tool + TOTAL.slow + spend_phase.long_answers
    )


def test_spend_alerts_fire_on_the_real_prometheus(stack: Stack, spend_phase: SpendPhase) -> None:
    rows = {(b.severity, b.long, b.short) for b in THRESHOLDS.spend.burn_rates}

    def active() -> tuple[bool, Any]:
        alerts = {
            name: stack.prometheus.alerts(name)
            for name in ("WabotSpendBurnRateHigh", "WabotBudgetRefusalsHigh", "WabotAnswersShortenedOften")
        }
        spend = {
            (a["labels"]["severity"], a["labels"]["long_window"], a["labels"]["short_window"])
            for a in alerts["WabotSpendBurnRateHigh"]
            if a["state"] == "firing"
        }
        others = all([a["state"] for a in alerts[n]] == ["firing"] for n in alerts if n != "WabotSpendBurnRateHigh")
        return spend == rows and others, alerts

    alerts = stack.poll("the spend alerts firing", active)
    cost = _cost(stack)
    for alert in alerts["WabotSpendBurnRateHigh"]:
        window = duration_seconds(alert["labels"]["long_window"])
        # The value is the spend pace in USD a day: all of the spend so far, over the long window, times a day.
        assert cost * 86400 / window <= float(alert["value"]) < cost * 86400 / window * 1.25, alert
        assert alert["annotations"]["runbook_url"].endswith("/alerts/runbooks/WabotSpendBurnRateHigh.md")
    [refusals] = alerts["WabotBudgetRefusalsHigh"]
    assert spend_phase.refused <= float(refusals["value"]) < spend_phase.refused * 1.25
    assert float(refusals["value"]) > THRESHOLDS.spend.budget_refusals
    [shortened] = alerts["WabotAnswersShortenedOften"]
    runs = TOTAL.total + spend_phase.long_answers
    assert _close(float(shortened["value"]), spend_phase.long_answers / runs, 1e-6), shortened
    # The fast row pages through Alertmanager.
    note = _wait_notification(stack, "page", "WabotSpendBurnRateHigh")
    assert {a["labels"]["severity"] for a in note.alerts} == {"critical"}


def test_spend_dashboard_queries_show_the_spend_the_budget_and_the_refusals(
    stack: Stack, spend_phase: SpendPhase
) -> None:
    cost = _cost(stack)
    wide = {"__rate_interval": W, "job": JOB}  # a window over the whole phase
    panels = dashboards.dashboard_json()["panels"]
    [row] = [i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == "Spend"]
    spend = panels[row + 1 :]
    assert spend and all(p["type"] != "row" for p in spend)  # the last row
    values: dict[tuple[str, str], float] = {}
    for title, t in dashboards.iter_targets({"panels": spend}):
        result = stack.prometheus.vector(dashboards.substitute(t["expr"], wide))
        assert result, (title, t["legendFormat"])
        for labels, value in result:
            assert math.isfinite(value), (title, labels, value)
            values[(title, labels.get("direction") or t["legendFormat"])] = value
    hours = duration_seconds(THRESHOLDS.spend.period) / duration_seconds(THRESHOLDS.spend.dashboard_window)
    assert values[("Spend per hour", "budget pace")] == pytest.approx(BUDGET_USD / hours)
    assert values[("Spend per day against the budget", "daily budget")] == BUDGET_USD
    assert (
        cost
        <= values[("Spend per day against the budget", f"spent in the last {THRESHOLDS.spend.period}")]
        < 1.25 * cost
    )
    refused = values[("Budget refusals and cut answers", "budget refusals")]
    assert spend_phase.refused <= refused < spend_phase.refused * 1.25
    cut = values[("Budget refusals and cut answers", "answers cut")]
    assert spend_phase.long_answers <= cut < spend_phase.long_answers * 1.25
    assert values[("Tokens per message", "output")] > 0 and values[("Cost per conversation", "per conversation")] > 0
