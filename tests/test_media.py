"""Voice notes, photos and PDFs: a real bot fetches them from the Twilio sink (Basic auth, a 307 to storage on another
origin) and hands them to the OpenAI simulator through the real SDK; every failure ends in a reply that says what
went wrong in the user's terms. Requests are checked against OpenAI's published schemas (tests/specs.py)."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bot.demo.media_storage import CHUNK_BYTES
from bot.demo.openai_simulator import OpenAISimulator
from bot.demo.twilio_sink import TwilioSink
from tests.conftest import Bot, LogLines, metric, new_sid
from tests.specs import known, problems, validator
from tests.waiting import wait_until

CREATE = validator("openai.json", "CreateResponse")
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


def media_form(bot: Bot, body: str, media: list[tuple[str, str]], sid: str, **extra: str) -> dict[str, str]:
    fields = {"NumMedia": str(len(media)), **extra}
    for i, (url, content_type) in enumerate(media):
        fields[f"MediaUrl{i}"] = url
        fields[f"MediaContentType{i}"] = content_type
    return bot.form(body, sid=sid, **fields)


def send_media(bot: Bot, sink: TwilioSink, body: str, items: list[tuple[bytes, str]], **extra: str) -> list[str]:
    """Post a message carrying `items` (served by the sink) and return the TwiML messages it got back."""
    sid = "MM" + new_sid()[2:]
    media = [(sink.add_media(data, content_type, message_sid=sid), content_type) for data, content_type in items]
    posted = bot.post_form(media_form(bot, body, media, sid, **extra))
    assert posted.status == 200, posted.text
    return posted.messages


def user_content(call: dict[str, Any]) -> list[dict[str, Any]]:
    """The content parts of the user message the bot sent (a plain string input is one input_text part)."""
    input_ = call["request"]["input"]
    if isinstance(input_, str):
        return [{"type": "input_text", "text": input_}]
    [message] = [item for item in input_ if item.get("role") == "user"]
    return list(message["content"])


def assert_valid_request(call: dict[str, Any]) -> None:
    assert problems(CREATE, call["request"], closed=True, tolerate=known("openai.json", "CreateResponse")) == []


@pytest.fixture
def media_host() -> Iterator[socket.socket]:
    """A listening socket on another origin: any fetch would show as a pending connection."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        yield server


def test_photo_with_caption_reaches_the_model_as_an_input_image(
    bot: Bot, sim: OpenAISimulator, sink: TwilioSink
) -> None:
    [reply] = send_media(bot, sink, "What is in this picture?", [(PNG, "image/png")])
    assert reply.startswith("[turn 1] ")
    assert "What is in this picture?" in reply
    [call] = sim.calls()
    assert_valid_request(call)
    text, image = user_content(call)
    assert text["type"] == "input_text"
    assert "photo" in text["text"] and "What is in this picture?" in text["text"]
    assert image == {
        "type": "input_image",
        "image_url": "data:image/png;base64," + base64.b64encode(PNG).decode(),
        "detail": "auto",
    }
    # Credentials went to the Twilio API origin only; the redirect to storage was followed without them.
    fetches = sink.wait_for_media_fetches(2)
    assert [(f["origin"], f["authorization"], f["status"]) for f in fetches] == [
        ("api", True, 307),
        ("storage", False, 200),
    ]


def test_photo_without_caption(bot: Bot, sim: OpenAISimulator, sink: TwilioSink) -> None:
    [reply] = send_media(bot, sink, "", [(PNG, "image/jpeg")])
    assert reply.startswith("[turn 1] ")
    assert "empty message" not in reply
    [call] = sim.calls()
    assert_valid_request(call)
    text, image = user_content(call)
    assert text["text"] == "[The user sent a photo, attached.]"
    assert image["image_url"].startswith("data:image/jpeg;base64,")


def test_pdf_reaches_the_model_as_an_input_file(bot: Bot, sim: OpenAISimulator, sink: TwilioSink) -> None:
    [reply] = send_media(bot, sink, "Summarise this", [(PDF, "application/pdf")])
    assert "Summarise this" in reply
    [call] = sim.calls()
    assert_valid_request(call)
    _, document = user_content(call)
    assert document == {
        "type": "input_file",
        "filename": "document-1.pdf",
        "file_data": "data:application/pdf;base64," + base64.b64encode(PDF).decode(),
    }


def test_two_attachments_in_one_message(bot: Bot, sim: OpenAISimulator, sink: TwilioSink) -> None:
    send_media(bot, sink, "both", [(PNG, "image/png"), (PDF, "application/pdf")])
    [call] = sim.calls()
    assert_valid_request(call)
    assert [part["type"] for part in user_content(call)] == ["input_text", "input_image", "input_file"]
    assert len(sink.wait_for_media_fetches(4)) == 4


def test_media_over_the_cap_stops_the_download_and_says_so(
    make_bot: Callable[..., Bot], sim: OpenAISimulator, sink: TwilioSink
) -> None:
    cap = 256 * 1024
    bot = make_bot(max_media_bytes=cap)
    big = bytes(32 * 1024 * 1024)
    sid = "MM" + new_sid()[2:]
    # Without Content-Length the bot learns the size only by reading: it must stop at the cap.
    url = sink.add_media(big, "application/pdf", message_sid=sid, chunked=True)
    [reply] = bot.post_form(media_form(bot, "", [(url, "application/pdf")], sid)).messages
    assert reply == "⚠️ Your PDF is too large for me (the limit is 256 KB). Please send a smaller one."
    assert sim.calls() == []  # nothing for the model: the reply is the notice alone
    [_, stored] = sink.wait_for_media_fetches(2)
    # What the storage handed out before it saw the connection closed: the cap, one chunk, and what the sockets and
    # buffers between the two processes' loops took meanwhile (0.2 to 1.5 MiB seen on loopback): far from all of it.
    assert stored["bytes"] <= cap + CHUNK_BYTES + 4 * 1024 * 1024, stored


def test_media_over_the_cap_by_content_length_is_not_read(
    make_bot: Callable[..., Bot], sim: OpenAISimulator, sink: TwilioSink
) -> None:
    bot = make_bot(max_media_bytes=64 * 1024)
    [reply] = send_media(bot, sink, "look", [(bytes(1024 * 1024), "image/png")])
    assert reply.startswith("⚠️ Your photo is too large for me (the limit is 64 KB). Please send a smaller one.\n\n")
    assert reply.endswith("look")  # the caption is still answered
    [call] = sim.calls()
    assert [part["type"] for part in user_content(call)] == ["input_text"]
    assert "could not be read" in user_content(call)[0]["text"]


def test_expired_media_says_it_may_have_expired(bot: Bot, sim: OpenAISimulator, sink: TwilioSink) -> None:
    sid = "MM" + new_sid()[2:]
    url = sink.add_media(b"OggS", "audio/ogg; codecs=opus", message_sid=sid)
    sink.expire_media(url)
    [reply] = bot.post_form(media_form(bot, "", [(url, "audio/ogg; codecs=opus")], sid)).messages
    assert reply == "⚠️ I couldn't download your voice note (it may have expired). Please send it again."
    assert sim.calls() == []


def test_unsupported_type_is_not_fetched_and_the_user_is_told(bot: Bot, sim: OpenAISimulator, sink: TwilioSink) -> None:
    [reply] = send_media(bot, sink, "", [(b"\x00\x00\x00\x18ftypmp42", "video/mp4")])
    assert reply == "⚠️ I can't read videos yet. I can read text, voice notes, photos and PDFs."
    assert sink.media_fetches() == []
    [reply] = send_media(bot, sink, "here is my card", [(b"BEGIN:VCARD", "text/vcard")])
    assert reply.startswith("⚠️ I can't read contact cards yet.")
    assert reply.endswith("here is my card")
    assert sink.media_fetches() == []


def test_media_url_on_another_origin_is_never_fetched(
    bot: Bot, sim: OpenAISimulator, sink: TwilioSink, media_host: socket.socket
) -> None:
    port = media_host.getsockname()[1]
    sid = "MM" + new_sid()[2:]
    elsewhere = (
        f"http://127.0.0.1:{port}/2010-04-01/Accounts/{bot.settings.twilio_account_sid}/Messages/{sid}/Media/ME1"
    )
    # The sink's own storage is another origin too: a MediaUrl there is not fetched either.
    storage = sink.add_media(PNG, "image/png", message_sid=sid)
    storage_url = sink.media_storage_url() + "/media/" + storage.rsplit("/", 1)[-1]
    form = media_form(bot, "", [(elsewhere, "image/jpeg"), (storage_url, "image/png")], sid)
    [reply] = bot.post_form(form).messages
    assert reply == "⚠️ I couldn't download your photo. Please send it again."
    bot.wait_idle()
    with pytest.raises(BlockingIOError):
        media_host.accept()  # nobody connected
    assert sink.media_fetches() == []
    assert elsewhere not in json.dumps(sim.calls())


def test_too_many_redirects_is_a_fetch_error(bot: Bot, sim: OpenAISimulator, sink: TwilioSink) -> None:
    sid = "MM" + new_sid()[2:]
    ok = sink.add_media(PNG, "image/png", message_sid=sid, hops=3)
    far = sink.add_media(PNG, "image/png", message_sid=sid, hops=4)
    [reply] = bot.post_form(media_form(bot, "two", [(ok, "image/png"), (far, "image/png")], sid)).messages
    assert reply.startswith("⚠️ I couldn't download your photo. Please send it again.\n\n")
    [call] = sim.calls()
    assert [part["type"] for part in user_content(call)] == ["input_text", "input_image"]
    assert not any(f["authorization"] for f in sink.media_fetches() if f["origin"] == "storage")


def test_metrics_and_media_log_events(bot: Bot, sim: OpenAISimulator, sink: TwilioSink, log_lines: LogLines) -> None:
    before = {
        (kind, outcome): metric("wabot_media_total", {"kind": kind, "outcome": outcome})
        for kind, outcome in [("image", "ok"), ("document", "ok"), ("other", "unsupported"), ("image", "too_large")]
    }
    fetches_before = metric("wabot_media_fetch_seconds_count")
    mark = log_lines.mark()
    send_media(bot, sink, "three", [(PNG, "image/png"), (PDF, "application/pdf"), (b"v", "video/mp4")])
    bot.wait_idle()
    assert metric("wabot_media_total", {"kind": "image", "outcome": "ok"}) == before[("image", "ok")] + 1
    assert metric("wabot_media_total", {"kind": "document", "outcome": "ok"}) == before[("document", "ok")] + 1
    assert metric("wabot_media_total", {"kind": "other", "outcome": "unsupported"}) == (
        before[("other", "unsupported")] + 1
    )
    assert metric("wabot_media_fetch_seconds_count") == fetches_before + 2
    events = [e for e in log_lines.events(mark) if e["event"] == "media"]
    assert [(e["kind"], e["outcome"], e["content_type"]) for e in events] == [
        ("image", "ok", "image/png"),
        ("document", "ok", "application/pdf"),
        ("other", "unsupported", "video/mp4"),
    ]
    assert [e["bytes"] for e in events] == [len(PNG), len(PDF), 0]
    assert events[0]["fetch_s"] > 0 and events[2]["fetch_s"] is None
    assert events[2]["error_type"] == "unsupported" and "error_type" not in events[0]
    # No bytes, no URL with the account's and message's sids, in any log line.
    text = "\n".join(log_lines.lines[mark:])
    assert base64.b64encode(PNG).decode() not in text
    assert "/Media/ME" not in text
    assert bot.settings.twilio_account_sid not in text


def test_media_spans_are_in_the_runs_trace_without_urls_or_bytes(
    bot: Bot, sim: OpenAISimulator, sink: TwilioSink
) -> None:
    send_media(bot, sink, "trace me", [(PNG, "image/png")])
    bot.wait_idle()
    wait_until(lambda: any(s.name == "wabot.media.fetch" for s in bot.spans.get_finished_spans()), 10, "media span")
    spans = bot.spans.get_finished_spans()
    [fetch] = [s for s in spans if s.name == "wabot.media.fetch"]
    [reply] = [s for s in spans if s.name == "wabot.reply"]
    assert fetch.context.trace_id == reply.context.trace_id
    assert dict(fetch.attributes or {}) == {
        "wabot.media.kind": "image",
        "wabot.media.content_type": "image/png",
        "wabot.media.index": 0,
        "wabot.media.bytes": len(PNG),
        "wabot.media.outcome": "ok",
    }
