"""An inbound message's attachments made readable for the model, and each one's fate told to the user.

Voice notes (audio) are downloaded and transcribed (OpenAI's transcription endpoint, WABOT_TRANSCRIBE_MODEL); the
transcript goes to the model as the user's words, marked as a voice note, and the reply starts with what was heard
(``🎤 "…"``, the first `HEARD_CHARS` characters) so a user can tell when the bot misheard. Photos and stickers go to
the model as `input_image` parts (a base64 data URL: the model service has no Twilio credentials), PDFs as
`input_file` parts, next to the caption. Anything else is not downloaded: the model is told what arrived and the
user that the bot cannot read it.

Every attachment that cannot be read (expired, over WABOT_MAX_MEDIA_BYTES, of a type the bot cannot read, a failed
or slow transcription) gets a line in the reply saying so in the user's terms (`ReadMedia.notices`); the model still
answers the rest of the message. Downloads and transcriptions of one message run at once, within `MEDIA_SHARE` of
the run's budget, so the model keeps time to answer.

Telemetry per attachment: spans ``wabot.media.fetch`` and ``wabot.media.transcribe`` (kind, type, size, outcome;
no bytes, URL or transcript), `wabot_media_total{kind,outcome}`, the fetch and transcription histograms, and a
``media`` log event (kind, outcome, content_type, bytes, fetch_s, transcribe_s, error_type; the transcript only
under WABOT_LOG_MESSAGE_BODIES, since it is a message body).
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass, field
from typing import Any

import openai
from openai import AsyncOpenAI
from opentelemetry import trace
from structlog.typing import FilteringBoundLogger

from bot.inbound import Media
from bot.media_fetch import MediaFetcher, MediaFetchError
from bot.settings import Settings
from telemetry import metrics, spend
from telemetry.recent import RecentActivity
from telemetry.tracing import ActiveSpan, record_error

__all__ = ["HEARD_CHARS", "MEDIA_SHARE", "MediaReader", "ReadMedia", "classify", "model_input"]

# Share of the run's budget the attachments of a message may take, all at once; the rest is the model's.
MEDIA_SHARE = 2 / 3
# How much of a transcript the reply repeats; the model gets all of it.
HEARD_CHARS = 300
CAN_READ = "I can read text, voice notes, photos and PDFs."


@dataclass(frozen=True)
class MediaType:
    """What the bot makes of a content type: the metric's kind, whether it reads it, and words for the user."""

    kind: str  # audio, image, document or other (telemetry.metrics.MEDIA_KINDS)
    readable: bool
    noun: str  # "voice note", "photo", ...: "your {noun}"
    plural: str  # "videos": "I can't read {plural} yet"
    extension: str = ""  # for the filename OpenAI is given (it recognises audio formats by it)


_AUDIO = {
    "audio/ogg": "ogg",
    "audio/opus": "ogg",
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
    "audio/mp4": "m4a",
    "audio/m4a": "m4a",
    "audio/x-m4a": "m4a",
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/webm": "webm",
    "audio/flac": "flac",
}
_IMAGES = {"image/jpeg": "jpg", "image/jpg": "jpg", "image/png": "png", "image/webp": "webp", "image/gif": "gif"}
_OFFICE = ("application/msword", "application/vnd.ms-", "application/vnd.openxmlformats", "application/vnd.oasis")


def base_type(content_type: str) -> str:
    """``audio/ogg; codecs=opus`` -> ``audio/ogg``."""
    return content_type.split(";", 1)[0].strip().lower()


def classify(content_type: str) -> MediaType:
    """How the bot treats an attachment of this (Twilio-reported) content type."""
    base = base_type(content_type)
    if base in _AUDIO:
        return MediaType("audio", True, "voice note", "voice notes", _AUDIO[base])
    if base.startswith("audio/"):
        return MediaType("audio", False, "audio file", f"audio files of this kind ({base})")
    if base in _IMAGES:
        noun = "sticker" if base == "image/webp" else "photo"
        return MediaType("image", True, noun, noun + "s", _IMAGES[base])
    if base.startswith("image/"):
        return MediaType("image", False, "image", f"images of this kind ({base})")
    if base == "application/pdf":
        return MediaType("document", True, "PDF", "PDFs", "pdf")
    if base.startswith(_OFFICE) or base in ("text/plain", "text/csv", "application/rtf"):
        return MediaType("document", False, "document", f"documents of this kind ({base})")
    if base.startswith("video/"):
        return MediaType("other", False, "video", "videos")
    if base in ("text/vcard", "text/x-vcard", "text/directory"):
        return MediaType("other", False, "contact card", "contact cards")
    return MediaType("other", False, "file", f"files of this kind ({base or 'unknown'})")


@dataclass
class _Attachment:
    """One attachment's way through download and transcription (its bytes live only as long as this does)."""

    media: Media
    type: MediaType
    index: int
    outcome: str = "ok"
    error_type: str | None = None
    data: bytes = b""
    size: int = 0
    fetch_s: float | None = None
    transcribe_s: float | None = None
    transcript: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    cost: spend.CallCost | None = None

    def fail(self, outcome: str, error_type: str) -> None:
        self.outcome, self.error_type, self.data = outcome, error_type, b""


@dataclass(frozen=True)
class ReadMedia:
    """What a message's attachments give the model and the user."""

    model_lines: tuple[str, ...]  # for the model, before the user's text
    parts: tuple[dict[str, Any], ...]  # input_image / input_file content parts
    notices: tuple[str, ...]  # for the user, at the top of the reply
    readable: bool  # at least one attachment reached the model
    costs: tuple[spend.CallCost, ...] = ()  # the transcriptions' usage, priced, for the run's spend


def model_input(prompt: str, read: ReadMedia | None) -> str | list[Any]:
    """The Responses API `input` for a user turn: plain text, or one user message with the media parts."""
    if read is None:
        return prompt
    text = "\n".join([*read.model_lines, prompt] if prompt else read.model_lines)
    if not read.parts:
        return text
    return [{"role": "user", "content": [{"type": "input_text", "text": text}, *read.parts]}]


def _size(limit: int) -> str:
    if limit >= 1024 * 1024:
        return f"{limit / (1024 * 1024):g} MB"
    return f"{max(limit // 1024, 1)} KB"


class MediaReader:
    """Downloads, transcribes and describes attachments; one per process, shared by every run."""

    def __init__(
        self,
        settings: Settings,
        client: AsyncOpenAI,
        fetcher: MediaFetcher,
        tracer: trace.Tracer,
        log: FilteringBoundLogger,
        recent: RecentActivity,
    ) -> None:
        self._client = client
        self._recent = recent
        self._fetcher = fetcher
        self._transcribe_model = settings.transcribe_model
        self._log_bodies = settings.log_message_bodies
        self._tracer = tracer
        self._log = log

    async def read(self, media: tuple[Media, ...], budget_s: float, message_sid: str) -> ReadMedia:
        """Read every attachment within `MEDIA_SHARE` of `budget_s`; never raises (a failure is a notice)."""
        deadline = asyncio.get_running_loop().time() + max(budget_s, 0.0) * MEDIA_SHARE
        attachments = [_Attachment(m, classify(m.content_type), i) for i, m in enumerate(media)]
        await asyncio.gather(*(self._read_one(a, deadline) for a in attachments))
        for attachment in attachments:
            self._record(attachment, message_sid)
        return self._assemble(attachments)

    async def _read_one(self, attachment: _Attachment, deadline: float) -> None:
        try:
            await self._read_steps(attachment, deadline)
        except Exception as exc:
            # A bug must cost this attachment, not the whole reply (a failed run stays owed and fails again).
            self._log.exception("media_read_failed", error_type=exc.__class__.__name__)
            attachment.fail("fetch_error" if attachment.fetch_s is None else "transcribe_error", exc.__class__.__name__)

    async def _read_steps(self, attachment: _Attachment, deadline: float) -> None:
        if not attachment.type.readable:
            attachment.fail("unsupported", "unsupported")
            return
        try:
            async with asyncio.timeout_at(deadline):
                await self._fetch(attachment)
        except TimeoutError:
            attachment.fail("fetch_error", "timeout")
        if attachment.outcome != "ok" or attachment.type.kind != "audio":
            return
        try:
            async with asyncio.timeout_at(deadline):
                await self._transcribe(attachment)
        except TimeoutError:
            attachment.fail("transcribe_error", "timeout")

    async def _fetch(self, attachment: _Attachment) -> None:
        with ActiveSpan(
            self._tracer,
            "wabot.media.fetch",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "wabot.media.kind": attachment.type.kind,
                "wabot.media.content_type": base_type(attachment.media.content_type),
                "wabot.media.index": attachment.index,
            },
        ) as span:
            if not self._fetcher.is_twilio(attachment.media.url):
                # Never fetched: only Twilio's API origin gets the bot's requests (and credentials).
                attachment.fail("fetch_error", "foreign_origin")
                record_error(span, "foreign_origin")
                return
            started = time.monotonic()
            try:
                attachment.data = await self._fetcher.fetch(attachment.media.url)
                attachment.size = len(attachment.data)
            except MediaFetchError as exc:
                attachment.fail("too_large" if exc.reason == "too_large" else "fetch_error", exc.reason)
            except BaseException:
                attachment.fail("fetch_error", "timeout")
                raise
            finally:
                attachment.fetch_s = time.monotonic() - started
                metrics.observe(metrics.MEDIA_FETCH_SECONDS, attachment.fetch_s)
                span.set_attribute("wabot.media.bytes", attachment.size)
                span.set_attribute("wabot.media.outcome", attachment.outcome)
                if attachment.error_type is not None:
                    record_error(span, attachment.error_type)

    async def _transcribe(self, attachment: _Attachment) -> None:
        with ActiveSpan(
            self._tracer,
            "wabot.media.transcribe",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "gen_ai.provider.name": "openai",
                "gen_ai.request.model": self._transcribe_model,
                "wabot.media.bytes": attachment.size,
            },
        ) as span:
            started = time.monotonic()
            filename = f"voice-note-{attachment.index + 1}.{attachment.type.extension}"
            try:
                transcription = await self._client.audio.transcriptions.create(
                    model=self._transcribe_model,
                    file=(filename, attachment.data, base_type(attachment.media.content_type)),
                )
                text = transcription.text.strip()
                attachment.usage = _usage(transcription)
                attachment.cost = spend.record(self._transcribe_model, getattr(transcription, "usage", None))
                span.set_attributes(
                    {
                        ("wabot.media.audio_seconds" if k == "audio_seconds" else f"gen_ai.usage.{k}"): v
                        for k, v in attachment.usage.items()
                    }
                )
                span.set_attribute("wabot.transcript.chars", len(text))
                if text:
                    attachment.transcript = text
                else:
                    attachment.fail("transcribe_error", "empty")
            except openai.OpenAIError as exc:
                timeout = isinstance(exc, openai.APITimeoutError)
                attachment.fail("transcribe_error", "timeout" if timeout else exc.__class__.__name__)
            except BaseException:
                attachment.fail("transcribe_error", "timeout")
                raise
            finally:
                attachment.data = b""  # the bytes are not needed past this point
                attachment.transcribe_s = time.monotonic() - started
                metrics.observe(metrics.TRANSCRIPTION_SECONDS, attachment.transcribe_s)
                span.set_attribute("wabot.media.outcome", attachment.outcome)
                if attachment.error_type is not None:
                    record_error(span, attachment.error_type)

    def _record(self, attachment: _Attachment, message_sid: str) -> None:
        metrics.MEDIA.labels(kind=attachment.type.kind, outcome=attachment.outcome).inc()
        self._recent.record_media(attachment.type.kind, attachment.outcome, attachment.transcribe_s)
        fields: dict[str, Any] = {
            "message_sid": message_sid,
            "kind": attachment.type.kind,
            "outcome": attachment.outcome,
            "content_type": base_type(attachment.media.content_type),
            "bytes": attachment.size,
            "fetch_s": None if attachment.fetch_s is None else round(attachment.fetch_s, 4),
        }
        if attachment.type.kind == "audio":
            fields["transcribe_s"] = None if attachment.transcribe_s is None else round(attachment.transcribe_s, 4)
            fields.update({f"transcribe_{k}": v for k, v in attachment.usage.items()})
        if attachment.error_type is not None:
            fields["error_type"] = attachment.error_type
        if self._log_bodies and attachment.transcript is not None:
            fields["transcript"] = attachment.transcript
        if attachment.outcome == "ok":
            self._log.info("media", **fields)
        else:
            self._log.warning("media", **fields)

    def _assemble(self, attachments: list[_Attachment]) -> ReadMedia:
        lines: list[str] = []
        parts: list[dict[str, Any]] = []
        notices: list[str] = []
        for a in attachments:
            noun, base = a.type.noun, base_type(a.media.content_type)
            if a.outcome != "ok":
                notice = _notice(a, self._fetcher.max_bytes)
                if notice not in notices:
                    notices.append(notice)
                lines.append(
                    f"[The user sent a {noun} ({base}) that could not be read: {notice.removeprefix('⚠️ ')} "
                    "They are told this above your answer; do not repeat it. Answer the rest of their message.]"
                )
            elif a.type.kind == "audio":
                assert a.transcript is not None
                heard = a.transcript if len(a.transcript) <= HEARD_CHARS else a.transcript[:HEARD_CHARS].rstrip() + "…"
                notices.append(f'🎤 "{heard}"')
                lines.append(f"[Voice note from the user, transcribed:]\n{a.transcript}")
            elif a.type.kind == "image":
                lines.append(f"[The user sent a {noun}, attached.]")
                data_url = f"data:{base};base64,{base64.b64encode(a.data).decode()}"
                parts.append({"type": "input_image", "image_url": data_url, "detail": "auto"})
            else:
                lines.append(f"[The user sent a {noun}, attached.]")
                data_url = f"data:{base};base64,{base64.b64encode(a.data).decode()}"
                filename = f"document-{a.index + 1}.{a.type.extension}"
                parts.append({"type": "input_file", "filename": filename, "file_data": data_url})
            a.data = b""
        readable = any(a.outcome == "ok" for a in attachments)
        costs = tuple(a.cost for a in attachments if a.cost is not None)
        return ReadMedia(tuple(lines), tuple(parts), tuple(notices), readable, costs)


def _usage(transcription: Any) -> dict[str, Any]:
    """What the transcription endpoint reports it billed (tokens, or seconds of audio), as it reports it."""
    usage = getattr(transcription, "usage", None)
    if usage is None:
        return {}
    if getattr(usage, "type", None) == "tokens":
        return {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens}
    if getattr(usage, "type", None) == "duration":
        return {"audio_seconds": usage.seconds}
    return {}


def _notice(a: _Attachment, max_bytes: int) -> str:
    """One line telling the user, in their terms, why an attachment was not read."""
    noun = a.type.noun
    if a.outcome == "unsupported":
        return f"⚠️ I can't read {a.type.plural} yet. {CAN_READ}"
    if a.outcome == "too_large":
        return f"⚠️ Your {noun} is too large for me (the limit is {_size(max_bytes)}). Please send a smaller one."
    if a.outcome == "transcribe_error":
        if a.error_type == "timeout":
            return f"⚠️ Transcribing your {noun} took too long. Please try again or type your message."
        if a.error_type == "empty":
            return f"⚠️ I couldn't hear any words in your {noun}. Please try again or type your message."
        return f"⚠️ I couldn't transcribe your {noun}. Please try again or type your message."
    if a.error_type == "not_found":
        return f"⚠️ I couldn't download your {noun} (it may have expired). Please send it again."
    if a.error_type == "timeout":
        return f"⚠️ Downloading your {noun} took too long. Please send it again."
    return f"⚠️ I couldn't download your {noun}. Please send it again."
