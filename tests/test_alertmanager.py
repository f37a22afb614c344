"""alerts/alertmanager.yml: amtool accepts it, and a real Alertmanager routes and inhibits as documented.

The Alertmanager under test runs on 127.0.0.1 with a copy of the real config made by code
(`alerts/testing.py`): webhook URLs point at a local receiver, timers are short. Routes, matchers and
inhibit rules are the deployed ones.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from alerts import testing
from tests.binaries import find_binary
from tests.conftest import free_port
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "alerts" / "alertmanager.yml"
NOTIFY_TIMEOUT = 15.0

pytestmark = pytest.mark.prometheus


def alertmanager_binary() -> str:
    return find_binary(
        "prometheus-alertmanager", "alertmanager", "prometheus-alertmanager", "/usr/bin/prometheus-alertmanager"
    )


def amtool_binary() -> str:
    return find_binary("prometheus-alertmanager", "amtool", "/usr/bin/amtool")


def test_amtool_check_config() -> None:
    result = subprocess.run([amtool_binary(), "check-config", str(CONFIG)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_receiver_is_a_placeholder_webhook() -> None:
    """Operators replace the URLs (documented in the file); a real endpoint must not slip into the repo."""
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    names = {r["name"] for r in config["receivers"]}
    assert names == {"page", "ticket", "deadmansswitch"}
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            assert urllib.parse.urlsplit(hook["url"]).hostname.endswith(".invalid"), hook["url"]


def test_test_copy_keeps_routing_and_redirects_every_receiver(tmp_path: Path) -> None:
    config = testing.alertmanager_test_config(CONFIG, "http://127.0.0.1:1")
    original = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    assert config["inhibit_rules"] == original["inhibit_rules"]
    assert [r.get("matchers") for r in config["route"]["routes"]] == [
        r.get("matchers") for r in original["route"]["routes"]
    ]
    for receiver in config["receivers"]:
        assert [h["url"] for h in receiver["webhook_configs"]] == [f"http://127.0.0.1:1/{receiver['name']}"]
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = subprocess.run([amtool_binary(), "check-config", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


class Alertmanager:
    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log

    def post(self, *alerts: dict[str, Any]) -> None:
        request = urllib.request.Request(
            f"{self.url}/api/v2/alerts",
            data=json.dumps(list(alerts)).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200

    def alerts(self, alertname: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode({"filter": f'alertname="{alertname}"'})
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts?{query}", timeout=5) as response:
            return json.loads(response.read())


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"alertmanager exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    wait_until(ready, timeout, f"alertmanager ready at {url}", details=lambda: log.read_text(errors="replace"))


@pytest.fixture(scope="module")
def receiver() -> Iterator[Any]:
    server = testing.LocalReceiver().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def alertmanager(receiver: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alertmanager]:
    binary = alertmanager_binary()
    workdir = tmp_path_factory.mktemp("alertmanager")
    config_path = workdir / "alertmanager.yml"
    config_path.write_text(yaml.safe_dump(testing.alertmanager_test_config(CONFIG, receiver.url)), encoding="utf-8")
    port = free_port()
    log = workdir / "alertmanager.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
                "--log.level=debug",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log)
        yield Alertmanager(url, process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _alert(alertname: str, severity: str, **labels: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "labels": {"alertname": alertname, "severity": severity, "job": "wabot", **labels},
        "annotations": {"summary": f"test {alertname}", "description": "from tests/test_alertmanager.py"},
        "startsAt": now.isoformat(),
        "endsAt": (now + timedelta(minutes=10)).isoformat(),
        "generatorURL": "http://127.0.0.1/test",
    }


def _wait(receiver: Any, alertmanager: Alertmanager, name: str, alertname: str) -> Any:
    try:
        return receiver.wait_for(lambda n: n.receiver == name and alertname in n.alertnames, NOTIFY_TIMEOUT)
    except TimeoutError as exc:
        pytest.fail(f"{exc}\nalertmanager log:\n{alertmanager.log.read_text(errors='replace')[-4000:]}")


def _receivers_of(receiver: Any, alertname: str) -> set[str]:
    return {n.receiver for n in receiver.received() if alertname in n.alertnames}


def test_critical_pages(alertmanager: Alertmanager, receiver: Any) -> None:
    alertmanager.post(_alert("TestCriticalOnly", "critical"))
    note = _wait(receiver, alertmanager, "page", "TestCriticalOnly")
    assert note.payload["status"] == "firing"
    assert note.payload["groupLabels"] == {"alertname": "TestCriticalOnly", "job": "wabot"}
    # A later sentinel through the same timers proves nothing else was sent for it meanwhile.
    alertmanager.post(_alert("TestSentinelCritical", "warning"))
    _wait(receiver, alertmanager, "ticket", "TestSentinelCritical")
    assert _receivers_of(receiver, "TestCriticalOnly") == {"page"}


def test_warning_tickets(alertmanager: Alertmanager, receiver: Any) -> None:
    alertmanager.post(_alert("TestWarningOnly", "warning"))
    note = _wait(receiver, alertmanager, "ticket", "TestWarningOnly")
    assert note.payload["commonLabels"]["severity"] == "warning"
    alertmanager.post(_alert("TestSentinelWarning", "critical"))
    _wait(receiver, alertmanager, "page", "TestSentinelWarning")
    assert _receivers_of(receiver, "TestWarningOnly") == {"ticket"}


def test_watchdog_goes_to_the_deadmansswitch_only(alertmanager: Alertmanager, receiver: Any) -> None:
    alertmanager.post(_alert("Watchdog", "none"))
    note = _wait(receiver, alertmanager, "deadmansswitch", "Watchdog")
    assert note.payload["receiver"] == "deadmansswitch"
    alertmanager.post(_alert("TestSentinelWatchdog", "warning"))
    _wait(receiver, alertmanager, "ticket", "TestSentinelWatchdog")
    assert _receivers_of(receiver, "Watchdog") == {"deadmansswitch"}


def test_critical_inhibits_warning_of_the_same_alertname(alertmanager: Alertmanager, receiver: Any) -> None:
    name = "TestBurnRate"
    alertmanager.post(
        _alert(name, "critical", long_window="1h", short_window="5m"),
        _alert(name, "warning", long_window="1d", short_window="2h"),
    )
    note = _wait(receiver, alertmanager, "page", name)
    assert [a["labels"]["severity"] for a in note.alerts] == ["critical"]

    # Alertmanager itself reports the warning as suppressed by the critical one.
    def suppressed() -> dict[str, Any]:
        states = {a["labels"]["severity"]: a["status"] for a in alertmanager.alerts(name)}
        return states if states.get("warning", {}).get("state") == "suppressed" else {}

    states = wait_until(suppressed, NOTIFY_TIMEOUT, "the warning to be suppressed")
    assert states["warning"]["inhibitedBy"], states
    assert states["critical"]["state"] == "active"

    # The warning's group flushed before this later sentinel's: the ticket receiver never got the warning.
    alertmanager.post(_alert("TestSentinelInhibit", "warning"))
    _wait(receiver, alertmanager, "ticket", "TestSentinelInhibit")
    assert _receivers_of(receiver, name) == {"page"}


def test_warning_of_another_alertname_is_not_inhibited(alertmanager: Alertmanager, receiver: Any) -> None:
    alertmanager.post(_alert("TestPageA", "critical"), _alert("TestTicketB", "warning"))
    _wait(receiver, alertmanager, "page", "TestPageA")
    _wait(receiver, alertmanager, "ticket", "TestTicketB")
