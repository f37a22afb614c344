"""The bot under test: a real `wabot serve` subprocess wired to the stubs through its environment."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

from bench.config import ACCOUNT_SID, AUTH_TOKEN, BOT_NUMBER
from bench.procs import VENV_BIN, Proc, clean_env, free_port, start, wait_until_up

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([0-9.eE+-]+|NaN|[+-]Inf)$")


def start_bot(
    work: Path,
    *,
    simulator: str,
    sink: str,
    otlp: str | None,
    workers: int = 1,
    env: dict[str, str] | None = None,
    wrapper: list[str] | None = None,
    up_timeout: float = 60.0,
) -> Proc:
    """Start `wabot serve` on free ports with a fresh SQLite store in `work`; return once /readyz answers.
    `wrapper` runs it under another program (valgrind), as `python -m bot`, so the wrapper sees Python itself."""
    port, metrics_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    settings = {
        "OPENAI_API_KEY": "bench",
        "OPENAI_BASE_URL": f"{simulator}/v1",
        "WABOT_MODEL": "sim-model",
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_WHATSAPP_FROM": BOT_NUMBER,
        "WABOT_TWILIO_API_URL": sink,
        "WABOT_PUBLIC_URL": url,
        "WABOT_STORE": f"sqlite:///{work}/wabot.db",
        # Every message comes from its own sender; no user is ever over a per-user limit, but say so anyway.
        "WABOT_USER_RATE_LIMIT": "0",
        "WABOT_LOG_LEVEL": "info",
        "OTEL_TRACES_EXPORTER": "otlp" if otlp else "none",
    }
    if otlp:
        settings["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp
    settings.update(env or {})
    command = [*wrapper, str(VENV_BIN / "python"), "-m", "bot"] if wrapper else [str(VENV_BIN / "wabot")]
    argv = [
        *command,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--workers",
        str(workers),
    ]
    env_vars = clean_env(**settings)
    # The GC probe (bench/gcprobe/sitecustomize.py) logs collector pauses next to the bot's own log lines.
    env_vars["PYTHONPATH"] = str(Path(__file__).with_name("gcprobe"))
    # cwd = the work directory: no .env of the developer's checkout is read.
    proc = start("wabot", argv, log_dir=work, env=env_vars, cwd=work)
    proc.url = url
    proc.extra["metrics_url"] = f"http://127.0.0.1:{metrics_port}/metrics"
    proc.extra["settings"] = settings
    try:
        wait_until_up(f"{url}/readyz", timeout=up_timeout)
    except TimeoutError:
        proc.stop()
        raise
    return proc


def start_peer(
    work: Path,
    *,
    simulator: str,
    sink: str,
    wrapper: list[str] | None = None,
    up_timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> Proc:
    """The minimal peer bot (bench/peer_bot.py) with the same environment as wabot's, on a free port (it reads
    WABOT_REPLY_TIMEOUT from `env`, and ignores the rest)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = {
        "OPENAI_API_KEY": "bench",
        "OPENAI_BASE_URL": f"{simulator}/v1",
        "WABOT_MODEL": "sim-model",
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_WHATSAPP_FROM": BOT_NUMBER,
        "WABOT_TWILIO_API_URL": sink,
        "WABOT_PUBLIC_URL": url,
        **(env or {}),
    }
    argv = [*(wrapper or []), str(VENV_BIN / "python"), "-m", "bench.peer_bot", "--port", str(port)]
    proc = start("peer", argv, log_dir=work, env=clean_env(**settings))
    proc.url = url
    proc.extra["settings"] = settings
    try:
        wait_until_up(f"{url}/readyz", timeout=up_timeout)
    except TimeoutError:
        proc.stop()
        raise
    return proc


def gc_pauses(bot: Proc) -> list[tuple[int, float, float]]:
    """(generation, pause ms, monotonic time) of every pause of 5 ms or more the GC probe logged."""
    pauses = []
    with bot.log_path.open(errors="replace") as lines:
        for line in lines:
            if line.startswith("BENCH_GC_PAUSE "):
                fields = dict(part.split("=", 1) for part in line.split()[1:])
                pauses.append((int(fields["gen"]), float(fields["ms"]), float(fields["at"])))
    return pauses


def scrape(bot: Proc) -> dict[str, float]:
    """The bot's metrics as {'name{labels}': value} (text exposition, aggregated over workers)."""
    with urllib.request.urlopen(bot.extra["metrics_url"], timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            samples[match[1] + (match[2] or "")] = float(match[3])
    return samples
