"""The demo's media: `wabot send --media` (files served through the Twilio sink, Twilio's signed media form) and
the sample files under tests/fixtures/media."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx2
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from twilio.request_validator import RequestValidator

from bot.demo.audio import inspect, voice_note
from bot.demo.loopback import LoopbackServer
from bot.demo.media_types import content_type, message_type
from bot.demo.twilio_sink import TwilioSink
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, CLIENT_TLS
from tests.forkserver import run_wabot
from tests.media_samples import jpeg_header, pdf, png, webp_header
from tests.served import DEMO_AUTH_TOKEN, DemoProcess

WABOT = [sys.executable, "-m", "bot"]
FIXTURES = Path(__file__).parent / "fixtures" / "media"
TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response><Message>got it</Message></Response>'


def test_the_sample_files_are_what_their_generators_make() -> None:
    """The committed samples are reproducible: a voice note carrying its transcript, a photo and a PDF."""
    voice = (FIXTURES / "voice.ogg").read_bytes()
    assert voice == voice_note("What's 17% of 2,340?", seconds=3.0)
    info = inspect("voice.ogg", voice)
    assert (info.seconds, info.measured, info.transcript) == (3.0, True, "What's 17% of 2,340?")
    assert (FIXTURES / "photo.png").read_bytes() == png(640, 480)
    assert (FIXTURES / "menu.pdf").read_bytes() == pdf(pages=2, text="Menu of the day")
    assert all(path.stat().st_size < 4096 for path in FIXTURES.iterdir())


def test_content_types_come_from_the_bytes_and_message_types_follow_twilio() -> None:
    assert content_type("voice.bin", voice_note("hi")) == "audio/ogg"
    assert content_type("x", png(2, 2)) == "image/png"
    assert content_type("x", jpeg_header(2, 2)) == "image/jpeg"
    assert content_type("x", webp_header(2, 2)) == "image/webp"
    assert content_type("x", pdf(1)) == "application/pdf"
    assert content_type("recording.webm", b"\x1a\x45\xdf\xa3rest") == "audio/webm"
    assert content_type("notes.txt", b"plain words") == "text/plain"
    assert content_type("blob", b"\x00\x01") == "application/octet-stream"
    assert message_type([]) == "text"
    assert message_type(["audio/ogg", "image/png"]) == "audio"
    assert message_type(["image/webp"]) == "sticker"
    assert message_type(["application/pdf"]) == "document"
    assert message_type(["text/vcard"]) == "contacts"


class RecordingWebhook:
    """A stand-in for the bot's /whatsapp that checks Twilio's signature and keeps each form it is posted."""

    def __init__(self) -> None:
        self.forms: list[dict[str, str]] = []
        self.app = FastAPI()
        self.url = ""

        @self.app.post("/whatsapp")
        async def whatsapp(request: Request) -> Response:
            form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
            signature = request.headers.get("x-twilio-signature", "")
            if not RequestValidator(AUTH_TOKEN).validate(f"{self.url}/whatsapp", form, signature):
                return Response("bad signature", status_code=403)
            self.forms.append(form)
            return Response(TWIML, media_type="application/xml")


@pytest.fixture
def webhook() -> Iterator[RecordingWebhook]:
    recorder = RecordingWebhook()
    with LoopbackServer(recorder.app, name="recording-webhook") as server:
        recorder.url = server.url
        yield recorder


def wabot_send(*args: str, url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "WABOT_", "OPENAI_"))}
    env.update(TWILIO_AUTH_TOKEN=AUTH_TOKEN, TWILIO_ACCOUNT_SID=ACCOUNT_SID, WABOT_PUBLIC_URL=url)
    return run_wabot(["send", *args, "--url", url], cwd=cwd, env=env, timeout=60)


def _one_line(stderr: str) -> str:
    """`stderr` with its box and line breaks taken out: click's usage errors come in a box that rich wraps to the
    terminal's width (80 columns when there is none), so the longer the path an error names, the later its words
    fall onto the next line (under a shorter temporary directory than pytest's, "does" on one and "not exist." on the
    next)."""
    return " ".join(re.sub("[\u2500-\u257f]", " ", stderr).split())


def test_wabot_send_media_serves_the_files_through_the_sink_and_posts_twilios_media_form(
    webhook: RecordingWebhook, sink: TwilioSink, sink_server: tuple[TwilioSink, str], tmp_path: Path
) -> None:
    sink_url = sink_server[1]
    voice, photo = tmp_path / "voice.ogg", tmp_path / "holiday.jpg"  # the photo's bytes say PNG: they win
    voice.write_bytes((FIXTURES / "voice.ogg").read_bytes())
    photo.write_bytes(png(64, 48))
    sent = wabot_send(
        "listen to this",
        "--media",
        str(voice),
        "--media",
        str(photo),
        "--sink",
        sink_url,
        url=webhook.url,
        cwd=tmp_path,
    )
    assert sent.returncode == 0, sent.stderr
    assert "got it" in sent.stdout
    [form] = webhook.forms
    sid = form["MessageSid"]
    assert sid.startswith("MM") and len(sid) == 34
    assert (form["Body"], form["NumMedia"], form["MessageType"]) == ("listen to this", "2", "audio")
    assert (form["MediaContentType0"], form["MediaContentType1"]) == ("audio/ogg", "image/png")
    prefix = f"{sink_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{sid}/Media/ME"
    assert form["MediaUrl0"].startswith(prefix) and form["MediaUrl1"].startswith(prefix)
    # The sink serves them as Twilio does: Basic auth, then a redirect to storage on another origin.
    assert httpx2.get(form["MediaUrl0"], verify=CLIENT_TLS).status_code == 401
    fetched = httpx2.get(form["MediaUrl0"], auth=(ACCOUNT_SID, AUTH_TOKEN), follow_redirects=True, verify=CLIENT_TLS)
    assert fetched.status_code == 200 and fetched.content == voice.read_bytes()
    assert fetched.headers["content-type"].startswith("audio/ogg")
    assert [r.status_code for r in fetched.history] == [307]
    photo_fetch = httpx2.get(
        form["MediaUrl1"], auth=(ACCOUNT_SID, AUTH_TOKEN), follow_redirects=True, verify=CLIENT_TLS
    )
    assert photo_fetch.content == photo.read_bytes()


def test_wabot_send_media_alone_finds_the_demo_sink_through_the_bot(tmp_path: Path) -> None:
    """With no --sink, `wabot send` asks the bot's demo where its sink is (GET /demo/sink); a voice note may come
    without a caption, as WhatsApp sends them."""
    sink = TwilioSink(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN)
    forms: list[dict[str, str]] = []
    app = FastAPI()
    with LoopbackServer(sink.app, name="sink") as sink_server:
        sink.api_url = sink_url = sink_server.url

        @app.get("/demo/sink")
        async def where() -> dict[str, Any]:
            return {"url": sink_server.url}

        @app.post("/whatsapp")
        async def whatsapp(request: Request) -> Response:
            forms.append(dict(parse_qsl((await request.body()).decode(), keep_blank_values=True)))
            return Response(TWIML, media_type="application/xml")

        try:
            with LoopbackServer(app, name="demo-bot") as bot:
                sent = wabot_send("--media", str(FIXTURES / "voice.ogg"), url=bot.url, cwd=tmp_path)
        finally:
            sink.shutdown()
    assert sent.returncode == 0, sent.stderr
    [form] = forms
    assert (form["Body"], form["NumMedia"], form["MediaContentType0"]) == ("", "1", "audio/ogg")
    assert form["MediaUrl0"].startswith(sink_url)


def test_wabot_send_media_refusals(webhook: RecordingWebhook, tmp_path: Path) -> None:
    nothing = wabot_send(url=webhook.url, cwd=tmp_path)
    assert nothing.returncode == 2 and "give a message, --media, or both" in nothing.stderr
    files = []
    for i in range(11):
        files += ["--media", str(tmp_path / f"{i}.png")]
        (tmp_path / f"{i}.png").write_bytes(png(2, 2))
    too_many = wabot_send("hi", *files, url=webhook.url, cwd=tmp_path)
    assert too_many.returncode == 2 and "at most 10" in too_many.stderr
    missing = wabot_send("hi", "--media", str(tmp_path / "nope.ogg"), url=webhook.url, cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in _one_line(missing.stderr), missing.stderr
    no_demo = wabot_send("hi", "--media", str(tmp_path / "0.png"), url=webhook.url, cwd=tmp_path)
    assert no_demo.returncode == 2 and "no demo sink" in no_demo.stderr
    assert webhook.forms == []


def test_a_voice_note_sent_with_wabot_send_is_answered_by_the_demo(tmp_path: Path) -> None:
    """The issue's "done when": `wabot send --media voice.ogg` against `wabot serve --demo` gets the spoken message
    answered (the sample voice note asks for a sum: the bot's calculate tool answers it)."""
    served = DemoProcess(tmp_path).wait_ready(timeout=30)
    try:
        mode = httpx2.post(f"{served.url}/demo/mode", json={"mode": "instant"}, timeout=10, verify=CLIENT_TLS)
        assert mode.json() == {"mode": "instant"}, mode.text
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "WABOT_", "OPENAI_"))}
        env["TWILIO_AUTH_TOKEN"] = DEMO_AUTH_TOKEN
        sent = run_wabot(["send", "--media", str(FIXTURES / "voice.ogg"), "--url", served.url], cwd=tmp_path, env=env)
    finally:
        served.stop()
    assert sent.returncode == 0, sent.stderr
    assert "17% of 2,340 is 397.8." in sent.stdout, sent.stdout
    assert "What's 17% of 2,340?" in sent.stdout  # what was heard, shown to the user
