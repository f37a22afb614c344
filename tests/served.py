"""`wabot serve` as a real subprocess, for tests that need a process of its own: signals, workers, load, memory.

One class for all of them: `ServedBot` runs `python -m bot serve` on free ports in a session of its own, with
the environment the test gives (a clean one otherwise: no OTEL_/WABOT_/PROMETHEUS_/TWILIO_ variables of the
caller leak in), its stdout+stderr in a file. `DemoProcess` is the same with `--demo`.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from xml.etree import ElementTree

import httpx2
from prometheus_client.parser import text_string_to_metric_families as parse_text
from twilio.request_validator import RequestValidator

from bot.demo.inbound_form import inbound_form
from bot.demo.runner import DEMO_ACCOUNT_SID, DEMO_FROM
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, BOT_NUMBER, CLIENT_TLS, free_port
from tests.forkserver import spawn_bot
from tests.waiting import wait_until

# The demo signs with TWILIO_AUTH_TOKEN when it is set (a token of its own per run otherwise): tests set this one.
DEMO_AUTH_TOKEN = "test-demo-auth-token"

ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def bot_env(simulator_url: str, sink_url: str, **extra: str) -> dict[str, str]:
    """Environment for a non-demo bot against the tests' OpenAI simulator and Twilio sink."""
    return {
        "OPENAI_API_KEY": "test-key",
        "OPENAI_BASE_URL": f"{simulator_url}/v1",
        "WABOT_MODEL": "sim-model",
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_WHATSAPP_FROM": BOT_NUMBER,
        "WABOT_TWILIO_API_URL": sink_url,
        **extra,
    }


class ServedBot:
    """`python -m bot serve` in a subprocess; `demo=True` adds `--demo` (its own simulator and sink)."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, *, demo: bool = False, workers: int = 1) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}"
        self.output = tmp / f"wabot-serve-{self.port}.log"
        self.auth_token, self.account_sid, self.to = (
            (DEMO_AUTH_TOKEN, DEMO_ACCOUNT_SID, DEMO_FROM) if demo else (AUTH_TOKEN, ACCOUNT_SID, BOT_NUMBER)
        )
        leaky = ("OTEL_", "WABOT_", "PROMETHEUS_", "TWILIO_", "OPENAI_")
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(leaky)},
            "WABOT_STORE": f"sqlite:///{tmp}/served-{self.port}.db",
            "WABOT_PUBLIC_URL": self.url,
            "OTEL_TRACES_EXPORTER": "none",
            "PYTHONUNBUFFERED": "1",
            **({"TWILIO_AUTH_TOKEN": DEMO_AUTH_TOKEN} if demo else {}),
            **(env or {}),
        }
        command = [sys.executable, "-m", "bot", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--metrics-port", str(self.metrics_port), "--workers", str(workers)]
        if demo:
            command.append("--demo")
        # The working directory is the test's own: a developer's .env in the repository must not configure it.
        # Forked from tests/forkserver.py, where openai, FastAPI and the other libraries are already imported.
        self.process = spawn_bot(command[3:], cwd=tmp, env=full_env, output=self.output)
        self.client = httpx2.Client(timeout=30.0, verify=CLIENT_TLS)

    # --- lifecycle ------------------------------------------------------------------------------------------

    def wait_ready(self, timeout: float = 30.0) -> ServedBot:
        wait_until(self._ready, timeout, f"wabot serve to answer {self.url}/readyz", details=self.text)
        return self

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"wabot serve exited with {self.process.returncode}:\n{self.text()}")
        try:
            return self.client.get(f"{self.url}/readyz", timeout=1.0).status_code == 200
        except httpx2.HTTPError:
            return False

    def runs_in_flight(self) -> int:
        return int(self.client.get(f"{self.url}/readyz", timeout=5.0).json()["runs_in_flight"])

    def wait_idle(self, timeout: float) -> None:
        wait_until(lambda: self.runs_in_flight() == 0, timeout, "no run in flight")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the whole session (workers too) after a bounded wait."""
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)

    # --- what it wrote --------------------------------------------------------------------------------------

    def text(self) -> str:
        return self.output.read_text(encoding="utf-8", errors="replace")

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text().splitlines() if line.startswith("{")]

    def memory_kib(self) -> dict[str, int]:
        """VmRSS (now) and VmHWM (peak) of the bot process, in KiB, from /proc."""
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
        return fields

    # --- talking to it as Twilio does -----------------------------------------------------------------------

    def form(self, body: str, sender: str, sid: str | None = None) -> dict[str, str]:
        return inbound_form(body, sender=sender, to=self.to, account_sid=self.account_sid, sid=sid)

    def post(
        self, form: dict[str, str], *, signature: str | None = None, new_connection: bool = False, **kwargs: Any
    ) -> httpx2.Response:
        """The webhook `form`, signed as Twilio signs it unless `signature` is given. On the kept-alive connection, or
        with `new_connection` on one of its own, closed after it: a bot of several workers then takes each such
        request in whichever worker accepts it."""
        if signature is None:
            signature = RequestValidator(self.auth_token).compute_signature(f"{self.url}/whatsapp", form)
        headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature}
        url, content = f"{self.url}/whatsapp", urlencode(form)
        if new_connection:
            return httpx2.post(url, content=content, headers=headers, timeout=30.0, verify=CLIENT_TLS, **kwargs)
        return self.client.post(url, content=content, headers=headers, **kwargs)

    def send(self, body: str, sender: str) -> list[str]:
        response = self.post(self.form(body, sender))
        assert response.status_code == 200, response.text
        return [m.text or "" for m in ElementTree.fromstring(response.text).iter("Message")]

    def send_all(self, messages: list[tuple[str, str]]) -> list[list[str]]:
        """Send (body, sender) pairs concurrently; the replies in the same order."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(messages)) as pool:
            return list(pool.map(lambda m: self.send(*m), messages))

    # --- its metrics port -----------------------------------------------------------------------------------

    def scrape(self, accept: str | None = None) -> httpx2.Response:
        response = self.client.get(f"{self.metrics_url}/metrics", headers={"Accept": accept} if accept else {})
        assert response.status_code == 200
        return response

    def load(self, body: str, users: int, first_number: int = 0) -> tuple[list[dict[str, Any]], float]:
        """`users` users sending `body` at once, from a process of their own (tests/loadgen.py): each one's
        result, and the generator's wall time."""
        command = [sys.executable, "-m", "tests.loadgen", "--url", self.url, "--public-url", self.url]
        command += ["--auth-token", AUTH_TOKEN, "--account-sid", ACCOUNT_SID, "--to", BOT_NUMBER]
        command += ["--users", str(users), "--body", body, "--timeout", "30", "--first-number", str(first_number)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=90, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout)
        return report["results"], report["wall_s"]

    def samples(self) -> Samples:
        """Every sample of a plain-text scrape, keyed by (name, sorted labels)."""
        out = {}
        for family in parse_text(self.scrape().text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def wait_for_sample(self, name: str, labels: dict[str, str], value: float, timeout: float = 15.0) -> None:
        key = (name, tuple(sorted(labels.items())))
        wait_until(lambda: self.samples().get(key) == value, timeout, f"{name}{labels} == {value}")


class DemoProcess(ServedBot):
    """`wabot serve --demo`: the bot with its own OpenAI simulator and Twilio sink, as `make run` starts it."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, workers: int = 1) -> None:
        super().__init__(tmp, env, demo=True, workers=workers)


def listening_on(port: int) -> set[str]:
    """Local IPv4 addresses with a socket in LISTEN state on `port`, read from the kernel's /proc/net/tcp."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            addresses.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return addresses
