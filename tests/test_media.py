"""Voice notes, photos and PDFs: a real bot fetches them from the Twilio sink (Basic auth, a 307 to storage on another
origin) and hands them to the OpenAI simulator through the real SDK; every failure ends in a reply that says what
went wrong in the user's terms. Requests are checked against OpenAI's published schemas (tests/specs.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.demo.audio import voice_note
from bot.demo.media_storage import CHUNK_BYTES
from bot.demo.openai_simulator import OpenAISimulator
from bot.demo.twilio_sink import TwilioSink
from bot.inbound import Media
from bot.status import collect
from bot.store import OwedReply, open_store
from tests.conftest import Bot, LogLines, metric, new_sid
from tests.redis_server import RedisServer
from tests.served import ServedBot, bot_env
from tests.specs import known, problems, validator
from tests.waiting import wait_until

CREATE = validator("openai.json", "CreateResponse")
TRANSCRIBE = validator("openai.json", "CreateTranscriptionRequest")
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
def bot(make_bot: Callable[..., Bot]) -> Bot:
    """A bot whose deadline leaves room for a download, a transcription and a model call on a loaded machine: the
    tests that expect an inline answer must not get the holding reply because the host is busy."""
    return make_bot(reply_timeout=5.0)


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
    bot = make_bot(max_media_bytes=cap, reply_timeout=5.0)
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
    bot = make_bot(max_media_bytes=64 * 1024, reply_timeout=5.0)
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
    # /status's window counts the same attachments.
    window = collect(bot.settings, bot.server.app.state.services.recent)["window"]["media"]
    assert (window["outcomes"]["ok"], window["outcomes"]["unsupported"]) == (2, 1)
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


# ---------------------------------------------------------------- voice notes


def test_voice_note_is_transcribed_and_answered_inline(
    bot: Bot, sim: OpenAISimulator, sink: TwilioSink, log_lines: LogLines
) -> None:
    sim.clear_transcriptions()
    mark = log_lines.mark()
    transcribed_before = metric("wabot_transcription_seconds_count")
    ok_before = metric("wabot_media_total", {"kind": "audio", "outcome": "ok"})
    transcribe_model = {"model": bot.settings.transcribe_model}
    tokens_before = {d: metric("wabot_tokens_total", {"direction": d, **transcribe_model}) for d in ("input", "output")}
    cost_before = metric("wabot_cost_usd_total", transcribe_model)
    [reply] = send_media(bot, sink, "", [(voice_note("what is on my calendar today"), "audio/ogg; codecs=opus")])
    # What was heard comes first, so a user can tell when the bot misheard; then the answer.
    assert reply == (
        '🎤 "what is on my calendar today"\n\n'
        "[turn 1] [Voice note from the user, transcribed:]\nwhat is on my calendar today"
    )
    [transcribed] = sim.transcriptions()
    assert (transcribed["model"], transcribed["filename"], transcribed["outcome"]) == (
        bot.settings.transcribe_model,
        "voice-note-1.ogg",
        "ok",
    )
    request = {"file": transcribed["filename"], "model": transcribed["model"], **transcribed["fields"]}
    assert problems(TRANSCRIBE, request) == [], request
    [call] = sim.calls()
    assert_valid_request(call)
    bot.wait_idle()
    assert metric("wabot_transcription_seconds_count") == transcribed_before + 1
    assert metric("wabot_media_total", {"kind": "audio", "outcome": "ok"}) == ok_before + 1
    [event] = [e for e in log_lines.events(mark) if e["event"] == "media"]
    assert (event["kind"], event["outcome"], event["content_type"]) == ("audio", "ok", "audio/ogg")
    assert event["transcribe_input_tokens"] > 0 and event["transcribe_output_tokens"] > 0
    assert event["transcribe_s"] > 0 and event["fetch_s"] > 0 and event["bytes"] > 0
    # The transcription is paid for: its tokens and cost are counted under its model, and in the run's usage.
    assert metric("wabot_tokens_total", {"direction": "input", **transcribe_model}) == (
        tokens_before["input"] + event["transcribe_input_tokens"]
    )
    assert metric("wabot_tokens_total", {"direction": "output", **transcribe_model}) == (
        tokens_before["output"] + event["transcribe_output_tokens"]
    )
    assert metric("wabot_cost_usd_total", transcribe_model) > cost_before
    [usage] = [e for e in log_lines.events(mark) if e["event"] == "ai_usage"]
    assert usage["calls"] == 2 and usage["input_tokens"] >= event["transcribe_input_tokens"]
    # A transcript is a message body: not logged unless WABOT_LOG_MESSAGE_BODIES says so.
    assert "calendar" not in "\n".join(log_lines.lines[mark:])


def test_transcript_is_logged_only_with_message_bodies_on(
    make_bot: Callable[..., Bot], sim: OpenAISimulator, sink: TwilioSink, log_lines: LogLines
) -> None:
    bot = make_bot(log_message_bodies=True, reply_timeout=5.0)
    mark = log_lines.mark()
    send_media(bot, sink, "", [(voice_note("buy oat milk"), "audio/ogg")])
    bot.wait_idle()
    [event] = [e for e in log_lines.events(mark) if e["event"] == "media"]
    assert event["transcript"] == "buy oat milk"


def test_slow_transcription_gets_the_holding_reply_and_the_answer_follows(
    make_bot: Callable[..., Bot], sim: OpenAISimulator, sink: TwilioSink
) -> None:
    user = "+15550107070"
    bot = make_bot(reply_timeout=1.0)
    # The simulator takes the transcript's own directive: this transcription takes 2 s, past the 1 s deadline.
    [reply] = send_media(
        bot, sink, "", [(voice_note("[sim:delay=2] tell me a joke"), "audio/ogg")], From=f"whatsapp:{user}"
    )
    assert reply == bot.settings.holding_message
    [followup] = sink.wait_for_messages(1, to=f"whatsapp:{user}", timeout=15)
    assert followup["body"].startswith('🎤 "tell me a joke"\n\n[turn 1] ')


def test_transcription_error_is_told_plainly(bot: Bot, sim: OpenAISimulator, sink: TwilioSink) -> None:
    before = metric("wabot_media_total", {"kind": "audio", "outcome": "transcribe_error"})
    [reply] = send_media(bot, sink, "", [(voice_note("[sim:error=400] hello"), "audio/ogg")])
    assert reply == "⚠️ I couldn't transcribe your voice note. Please try again or type your message."
    assert sim.calls() == []
    assert metric("wabot_media_total", {"kind": "audio", "outcome": "transcribe_error"}) == before + 1


def test_transcription_that_hangs_is_given_up_and_told(
    make_bot: Callable[..., Bot], sim: OpenAISimulator, sink: TwilioSink
) -> None:
    user = "+15550107171"
    bot = make_bot(followup_timeout=3.0)
    items = [(voice_note("[sim:hang] hello"), "audio/ogg")]
    [reply] = send_media(bot, sink, "and a question", items, From=f"whatsapp:{user}")
    assert reply == bot.settings.holding_message
    [followup] = sink.wait_for_messages(1, to=f"whatsapp:{user}", timeout=15)
    assert followup["body"].startswith(
        "⚠️ Transcribing your voice note took too long. Please try again or type your message.\n\n[turn 1] "
    )
    assert followup["body"].endswith("and a question")


@pytest.fixture
def served_bots(
    simulator: tuple[OpenAISimulator, str], sink_server: tuple[TwilioSink, str], tmp_path: Path
) -> Iterator[Callable[..., ServedBot]]:
    """`python -m bot serve` processes against this test's simulator and sink, stopped at the end."""
    processes: list[ServedBot] = []

    def start(**env: str) -> ServedBot:
        settings = bot_env(simulator[1], sink_server[1], WABOT_REPLY_TIMEOUT="0.5", **env)
        processes.append(ServedBot(tmp_path, settings))
        return processes[-1].wait_ready(timeout=30)

    yield start
    for process in processes:
        process.stop()


def test_killed_mid_transcription_the_restarted_bot_fetches_and_transcribes_again(
    served_bots: Callable[..., ServedBot], tmp_path: Path, sim: OpenAISimulator, sink: TwilioSink
) -> None:
    sim.clear_transcriptions()
    store = f"sqlite:///{tmp_path}/media-crash.db"
    user = "+15550108080"
    first = served_bots(WABOT_STORE=store)
    sid = "MM" + new_sid()[2:]
    url = sink.add_media(voice_note("[sim:delay=3] remember the milk"), "audio/ogg", message_sid=sid)
    form = {**first.form("", user, sid), "NumMedia": "1", "MediaUrl0": url, "MediaContentType0": "audio/ogg"}
    response = first.post(form)
    assert response.status_code == 200 and "working on your answer" in response.text
    sim.wait_for_transcriptions(1, timeout=15)  # the transcription is under way
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(5)
    assert sink.messages() == []

    second = served_bots(WABOT_STORE=store)
    [delivered] = sink.wait_for_messages(1, to=f"whatsapp:{user}", timeout=30)
    assert delivered["body"].startswith('🎤 "remember the milk"\n\n[turn 1] ')
    second.wait_idle(30)
    # The journal kept the media list, not the bytes: the restarted bot downloaded and transcribed it again.
    assert [f["origin"] for f in sink.media_fetches()] == ["api", "storage", "api", "storage"]
    assert len(sim.transcriptions()) == 2


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_the_journal_keeps_the_media_list_and_no_bytes(backend: str, tmp_path: Path) -> None:
    media = (Media("https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1", "audio/ogg"),)
    reply = OwedReply(sid=new_sid(), to="whatsapp:+15550109090", user_key="u", prompt="", arrived_at=1.0, media=media)
    plain = OwedReply(sid=new_sid(), to="whatsapp:+15550109091", user_key="v", prompt="hi", arrived_at=2.0)
    redis = RedisServer(tmp_path) if backend == "redis" else None
    url = redis.start().url if redis else f"sqlite:///{tmp_path}/journal.db"
    try:
        first = await open_store(url, dedupe_ttl_s=3600, lease_s=0.5)
        assert await first.accept(reply) and await first.accept(plain)
        await first.close()  # as good as a crash for the journal: the entries stay owed
        second = await open_store(url, dedupe_ttl_s=3600, lease_s=0.5)
        try:
            claimed: list[OwedReply] = []
            for _ in range(50):  # a Redis lease lapses within 0.5 s; SQLite answers at once
                claimed += await second.claim_orphans()
                if len(claimed) == 2:
                    break
                await asyncio.sleep(0.05)
            by_sid = {r.sid: r for r in claimed}
            assert by_sid[reply.sid].media == media
            assert by_sid[plain.sid].media == ()
        finally:
            await second.close()
    finally:
        if redis:
            redis.stop()


async def test_a_journal_from_before_media_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE pending (sid TEXT PRIMARY KEY, to_addr TEXT NOT NULL, user_key TEXT NOT NULL, "
            "prompt TEXT NOT NULL, arrived_at REAL NOT NULL, answer_parts TEXT, kind TEXT, "
            "parts_sent INTEGER NOT NULL DEFAULT 0, traceparent TEXT)"
        )
        db.execute("INSERT INTO pending (sid, to_addr, user_key, prompt, arrived_at) VALUES ('SM1', 't', 'u', 'hi', 1)")
    store = await open_store(f"sqlite:///{path}", dedupe_ttl_s=3600)
    try:
        [owed] = await store.claim_orphans()
        assert (owed.sid, owed.prompt, owed.media) == ("SM1", "hi", ())
    finally:
        await store.close()


def test_transcription_span_has_the_model_and_usage_but_no_words(
    bot: Bot, sim: OpenAISimulator, sink: TwilioSink
) -> None:
    send_media(bot, sink, "", [(voice_note("a secret plan"), "audio/ogg")])
    bot.wait_idle()
    wait_until(lambda: any(s.name == "wabot.media.transcribe" for s in bot.spans.get_finished_spans()), 10, "span")
    spans = bot.spans.get_finished_spans()
    [transcribe] = [s for s in spans if s.name == "wabot.media.transcribe"]
    [reply] = [s for s in spans if s.name == "wabot.reply"]
    assert transcribe.context.trace_id == reply.context.trace_id
    attributes = dict(transcribe.attributes or {})
    assert attributes["gen_ai.request.model"] == bot.settings.transcribe_model
    assert attributes["wabot.media.outcome"] == "ok"
    assert attributes["gen_ai.usage.input_tokens"] > 0 and attributes["gen_ai.usage.output_tokens"] > 0
    assert "secret" not in json.dumps({s.name: dict(s.attributes or {}) for s in spans})


def test_a_failed_run_still_says_which_attachment_failed(bot: Bot, sim: OpenAISimulator, sink: TwilioSink) -> None:
    sid = "MM" + new_sid()[2:]
    url = sink.add_media(PNG, "image/png", message_sid=sid)
    sink.expire_media(url)
    [notice, *apology] = (
        bot.post_form(media_form(bot, "and this [sim:error=400]", [(url, "image/png")], sid)).messages[0].split("\n\n")
    )
    assert notice == "⚠️ I couldn't download your photo (it may have expired). Please send it again."
    assert apology == [bot.settings.apology_message]


def test_credentials_reach_the_twilio_api_origin_only(bot: Bot, sim: OpenAISimulator, sink: TwilioSink) -> None:
    sid = "MM" + new_sid()[2:]
    voice = sink.add_media(voice_note("hello there"), "audio/ogg", message_sid=sid, hops=2)
    photo = sink.add_media(PNG, "image/png", message_sid=sid)
    [reply] = bot.post_form(media_form(bot, "", [(voice, "audio/ogg"), (photo, "image/png")], sid)).messages
    assert reply.startswith('🎤 "hello there"\n\n[turn 1] ')
    fetches = sink.wait_for_media_fetches(5)
    assert sorted((f["origin"], f["authorization"]) for f in fetches) == [
        ("api", True),
        ("api", True),
        ("storage", False),
        ("storage", False),
        ("storage", False),
    ]
