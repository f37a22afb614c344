"""The chat page's attachments over real HTTP, without a browser: /demo/send_media stores the files in the demo's
Twilio sink under one MM… message and posts Twilio's signed media form; /demo/media/{MediaSid} serves them back for
the bubbles; /demo/sink says where `wabot send --media` stores its files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from bot.demo.chat import MAX_MEDIA
from tests.conftest import LogLines
from tests.media_samples import pdf, png
from tests.test_chat_page import DemoBot, start_demo_bot

FIXTURES = Path(__file__).parent / "fixtures" / "media"


@pytest.fixture
def demo_bot(tmp_path: Path, log_lines: LogLines) -> Iterator[DemoBot]:
    bot = start_demo_bot(tmp_path, echo=True)
    yield bot
    bot.stop()


def send_media(bot: DemoBot, user: str, files: list[tuple[str, bytes, str]], text: str = "") -> httpx2.Response:
    return bot.client.post(
        f"{bot.url}/demo/send_media",
        data={"user": user, "text": text},
        files=[("media", file) for file in files],
    )


def test_attachments_are_stored_in_the_sink_posted_as_twilios_media_form_and_shown(demo_bot: DemoBot) -> None:
    user = "+15550004001"
    photo, voice, menu = png(64, 48), (FIXTURES / "voice.ogg").read_bytes(), pdf(pages=2)
    files = [
        ("photo.png", photo, "image/png"),
        ("voice-note.ogg", voice, "audio/ogg"),
        ("menu.pdf", menu, "application/octet-stream"),  # the bytes decide the type, not what the browser said
    ]
    response = send_media(demo_bot, user, files, text="look at these")
    assert response.status_code == 200, response.text
    sent, reply = demo_bot.events(user, 2)
    assert (sent["role"], sent["text"]) == ("user", "look at these")
    assert [(m["kind"], m["type"], m["name"], m["bytes"]) for m in sent["media"]] == [
        ("image", "image/png", "photo.png", len(photo)),
        ("audio", "audio/ogg", "voice-note.ogg", len(voice)),
        ("document", "application/pdf", "menu.pdf", len(menu)),
    ]
    assert (reply["role"], reply["reply_to"]) == ("bot", sent["id"])  # the bot answered the message
    # Each bubble's file comes back from the sink, byte for byte, with its type.
    for media, data in zip(sent["media"], (photo, voice, menu), strict=True):
        assert media["url"].startswith("/demo/media/ME")
        served = demo_bot.client.get(f"{demo_bot.url}{media['url']}")
        assert served.status_code == 200 and served.content == data
        assert served.headers["content-type"].startswith(media["type"])
    # The sink holds them under one MM… message, behind Basic auth, as Twilio serves an inbound message's media.
    fetches = demo_bot.demo.sink.media_fetches()
    api_fetches = [f for f in fetches if f["origin"] == "api"]
    assert len(api_fetches) >= 3 and all(f["authorization"] for f in api_fetches)


def test_the_demo_says_where_its_sink_is(demo_bot: DemoBot) -> None:
    where = demo_bot.client.get(f"{demo_bot.url}/demo/sink")
    assert where.status_code == 200
    assert where.json() == {"url": demo_bot.settings.twilio_api_url}
    assert where.json()["url"] == demo_bot.demo.sink.api_url


@pytest.mark.parametrize(
    ("data", "files", "status", "detail"),
    [
        ({"user": "5550004003"}, [("a.png", png(2, 2), "image/png")], 422, "international form"),
        ({"user": "+15550004003"}, [], 422, "send 1 to 10 files"),
        ({"user": "+15550004003", "text": "x" * 4097}, [("a.png", png(2, 2), "image/png")], 422, "4096"),
    ],
)
def test_bad_sends_are_refused(
    demo_bot: DemoBot, data: dict[str, str], files: list[tuple[str, bytes, str]], status: int, detail: str
) -> None:
    response = demo_bot.client.post(
        f"{demo_bot.url}/demo/send_media", data=data, files=[("media", f) for f in files] or None
    )
    assert response.status_code == status, response.text
    assert detail in response.text
    assert demo_bot.demo.sink.media_fetches() == []


def test_more_than_ten_files_and_unknown_media_are_refused(demo_bot: DemoBot) -> None:
    files: list[tuple[str, Any]] = [("media", (f"{i}.png", png(2, 2), "image/png")) for i in range(MAX_MEDIA + 1)]
    response = demo_bot.client.post(f"{demo_bot.url}/demo/send_media", data={"user": "+15550004004"}, files=files)
    assert response.status_code in (400, 422), response.text
    assert demo_bot.client.get(f"{demo_bot.url}/demo/media/ME{'0' * 32}").status_code == 404


def test_media_is_served_in_byte_ranges_for_the_audio_player(demo_bot: DemoBot) -> None:
    user = "+15550004005"
    voice = (FIXTURES / "voice.ogg").read_bytes()
    assert send_media(demo_bot, user, [("voice-note.ogg", voice, "audio/ogg")]).status_code == 200
    [sent, _reply] = demo_bot.events(user, 2)
    url = f"{demo_bot.url}{sent['media'][0]['url']}"
    whole = demo_bot.client.get(url)
    assert (whole.status_code, whole.headers["accept-ranges"], whole.content) == (200, "bytes", voice)
    head = demo_bot.client.get(url, headers={"Range": "bytes=0-9"})
    assert (head.status_code, head.content, head.headers["content-range"]) == (
        206,
        voice[:10],
        f"bytes 0-9/{len(voice)}",
    )
    tail = demo_bot.client.get(url, headers={"Range": "bytes=-4"})
    assert (tail.status_code, tail.content) == (206, voice[-4:])
    rest = demo_bot.client.get(url, headers={"Range": f"bytes={len(voice) - 3}-"})
    assert (rest.status_code, rest.content) == (206, voice[-3:])
    beyond = demo_bot.client.get(url, headers={"Range": f"bytes={len(voice)}-"})
    assert (beyond.status_code, beyond.headers["content-range"]) == (416, f"bytes */{len(voice)}")
