"""The `wabot` command: serve the bot, send a signed test message, show its status, analyze logs."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode
from xml.etree import ElementTree

import httpx2
import typer
from pydantic import AliasChoices, SecretStr
from twilio.request_validator import RequestValidator

from bot.settings import Settings
from bot.tls import tls_context

app = typer.Typer(add_completion=False, no_args_is_help=True, help="wabot: a WhatsApp AI bot that always answers.")


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Interface for the webhook [default: 0.0.0.0; 127.0.0.1 with --demo].")
    ] = None,
    port: Annotated[int, typer.Option(help="Port for the webhook.")] = 8000,
    metrics_port: Annotated[int, typer.Option(help="Port for /metrics (Prometheus).")] = 9464,
    demo: Annotated[bool, typer.Option(help="Run against a local OpenAI simulator and Twilio sink.")] = False,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes (metrics aggregate across them).")] = 1,
) -> None:
    """Serve the Twilio webhook (POST /whatsapp) until SIGTERM."""
    settings = Settings()
    if workers > 1 and not settings.prometheus_multiproc_dir:
        # prometheus-client reads this at import, in every worker: it must be set before anything imports it.
        settings = _export(settings, {"prometheus_multiproc_dir": tempfile.mkdtemp(prefix="wabot-metrics-")})
    from bot.server import serve as run_server
    from telemetry.logging import get_logger, setup_logging

    setup_logging(settings.log_level)
    log = get_logger("wabot")
    demo_handle = None
    if demo:
        from bot.demo.runner import start_demo

        # The demo signs messages for anyone who can reach its chat page: this machine only, unless told otherwise.
        host = host or "127.0.0.1"
        if not _loopback(host):
            log.warning("demo_exposed", host=host, reason="--host puts the demo and its chat page on the network")
            typer.echo(
                f"WARNING: the demo listens on {host}: anyone who can reach port {port} can use its chat page, "
                "send messages as any number and read every conversation. Use it on a trusted network only.",
                err=True,
            )
        local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        settings, demo_handle = start_demo(settings, bot_url=f"http://{local}:{port}")
        if workers > 1:
            settings = _export(settings, demo_handle.overrides)
        if demo_handle.token_generated:
            _write_private(Path(settings.demo_token_file), settings.secret("twilio_auth_token"))
        log.info(
            "demo_started",
            openai=settings.openai_base_url,
            twilio=settings.twilio_api_url,
            token_file=str(Path(settings.demo_token_file).resolve()) if demo_handle.token_generated else None,
        )
    else:
        missing = settings.missing_for_production()
        if missing:
            typer.echo(
                "wabot serve: missing settings: " + ", ".join(missing) + ". Set them in the environment or .env, "
                "or run `wabot serve --demo` to try the bot locally.",
                err=True,
            )
            raise typer.Exit(2)
    log.info("serving", port=port, metrics_port=metrics_port, reply_timeout_s=settings.reply_timeout)
    try:
        run_server(
            settings, host=host or "0.0.0.0", port=port, metrics_port=metrics_port, workers=workers, demo=demo_handle
        )
    finally:
        if demo_handle is not None:
            demo_handle.stop()
            if demo_handle.token_generated:
                _remove_token(Path(settings.demo_token_file), settings.secret("twilio_auth_token"))


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _write_private(path: Path, text: str) -> None:
    """Write `text` to a file only its owner can read (created 0600; an existing file is made so first)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


def _remove_token(path: Path, token: str) -> None:
    """Remove the demo's token file, unless another demo run has written its own there since."""
    try:
        if path.read_text(encoding="utf-8").strip() == token:
            path.unlink()
    except OSError:
        pass


def _export(settings: Settings, updates: dict[str, Any]) -> Settings:
    """Apply `updates` here and hand them to worker processes, which build their settings from the environment."""
    for name, value in updates.items():
        alias = Settings.model_fields[name].validation_alias
        env_name = alias.choices[0] if isinstance(alias, AliasChoices) else name.upper()
        os.environ[str(env_name)] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
    return settings.model_copy(update=updates)


@app.command()
def send(
    text: Annotated[str, typer.Argument(help="The message body (a caption with --media; may be empty then).")] = "",
    from_: Annotated[str, typer.Option("--from", help="The sender's phone number.")] = "+15555550100",
    url: Annotated[str, typer.Option(help="The bot's base URL.")] = "http://127.0.0.1:8000",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the webhook's answer.")] = 20.0,
    media: Annotated[
        list[Path] | None,
        typer.Option(
            "--media",
            exists=True,
            dir_okay=False,
            readable=True,
            help="A file to attach (voice note, photo, PDF...), served through the demo's Twilio sink; up to 10.",
        ),
    ] = None,
    sink: Annotated[
        str | None,
        typer.Option(help="The demo's Twilio sink, for --media [default: asked of the bot's demo at --url]."),
    ] = None,
) -> None:
    """Sign and post a message the way Twilio would, and print the bot's reply."""
    from bot.demo.inbound_form import MAX_MEDIA, inbound_form, new_message_sid
    from bot.demo.runner import DEMO_ACCOUNT_SID, DEMO_FROM

    files = list(media or [])
    if not text and not files:
        typer.echo("wabot send: give a message, --media, or both.", err=True)
        raise typer.Exit(2)
    if len(files) > MAX_MEDIA:
        typer.echo(f"wabot send: at most {MAX_MEDIA} --media on one message (Twilio's limit).", err=True)
        raise typer.Exit(2)
    settings = Settings()
    token = settings.secret("twilio_auth_token") or _demo_token(Path(settings.demo_token_file))
    if not token:
        typer.echo(
            "wabot send: no TWILIO_AUTH_TOKEN, and no demo token file "
            f"({settings.demo_token_file}, written by `wabot serve --demo` where it runs).",
            err=True,
        )
        raise typer.Exit(2)
    sid = new_message_sid(media=bool(files))
    attached = _upload_media(files, sid=sid, sink=sink, bot_url=url, timeout=timeout) if files else []
    form = inbound_form(
        text,
        sender=from_,
        to=settings.twilio_whatsapp_from or DEMO_FROM,
        account_sid=settings.twilio_account_sid or DEMO_ACCOUNT_SID,
        sid=sid,
        profile_name="wabot send",
        media=attached,
    )
    target = f"{url.rstrip('/')}/whatsapp"
    signed_url = f"{settings.public_url}/whatsapp" if settings.public_url else target
    signature = RequestValidator(token).compute_signature(signed_url, form)
    try:
        response = httpx2.post(
            target,
            content=urlencode(form),
            headers={"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature},
            timeout=timeout,
            verify=tls_context(),
        )
    except httpx2.HTTPError as exc:
        typer.echo(f"wabot send: could not reach {target}: {exc}", err=True)
        raise typer.Exit(1) from exc
    if response.status_code != 200:
        typer.echo(f"HTTP {response.status_code}: {response.text.strip()}", err=True)
        raise typer.Exit(1)
    elapsed = response.elapsed.total_seconds()
    messages = [m.text or "" for m in ElementTree.fromstring(response.text).iter("Message")]
    if not messages:
        typer.echo(f"(no reply, {elapsed:.2f} s)")
    for message in messages:
        typer.echo(f"[{elapsed:.2f} s] {message}")


def _upload_media(
    files: list[Path], *, sid: str, sink: str | None, bot_url: str, timeout: float
) -> list[tuple[str, str]]:
    """Store each file in the demo's Twilio sink, under message `sid`; their (MediaUrl, content type), in order."""
    from bot.demo.media_types import content_type

    try:
        if sink is None:
            found = httpx2.get(f"{bot_url.rstrip('/')}/demo/sink", timeout=timeout, verify=tls_context())
            if found.status_code != 200:
                typer.echo(
                    f"wabot send: {bot_url} has no demo sink to serve --media (HTTP {found.status_code}); run "
                    "`wabot serve --demo` there, or give the sink's URL with --sink.",
                    err=True,
                )
                raise typer.Exit(2)
            sink = str(found.json()["url"])
        attached: list[tuple[str, str]] = []
        for path in files:
            data = path.read_bytes()
            kind = content_type(path.name, data)
            stored = httpx2.post(
                f"{sink.rstrip('/')}/_sink/media",
                params={"message_sid": sid},
                content=data,
                headers={"Content-Type": kind},
                timeout=timeout,
                verify=tls_context(),
            )
            if stored.status_code != 201:
                typer.echo(f"wabot send: the sink refused {path}: HTTP {stored.status_code} {stored.text}", err=True)
                raise typer.Exit(1)
            attached.append((str(stored.json()["media_url"]), kind))
    except httpx2.HTTPError as exc:
        typer.echo(f"wabot send: could not store the media in the demo's sink: {exc}", err=True)
        raise typer.Exit(1) from exc
    return attached


def _demo_token(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


@app.command()
def status(
    url: Annotated[
        str, typer.Option(help="The bot's metrics port (where /status is served).")
    ] = "http://127.0.0.1:9464",
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON as served.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 10.0,
) -> None:
    """Print the bot's status: the last 5 minutes of its process, and its alerts in Prometheus."""
    import json

    from bot.status import render_text

    target = f"{url.rstrip('/')}/status?format=json"
    try:
        response = httpx2.get(target, timeout=timeout, verify=tls_context())
        response.raise_for_status()
        data = response.json()
    except (httpx2.HTTPError, ValueError) as exc:
        typer.echo(f"wabot status: could not read {target}: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps(data, indent=2) if as_json else render_text(data))


@app.command()
def analyze(
    files: Annotated[list[Path] | None, typer.Argument(help="JSON log files; none or '-' reads stdin.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Summarize wabot's JSON logs: timeouts, total time, follow-ups, and a deadline recommendation."""
    from telemetry.analyze import run

    raise typer.Exit(run(list(files or []), as_json=as_json, out=sys.stdout))
