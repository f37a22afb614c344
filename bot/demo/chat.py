"""The demo's chat page: talk to the bot in a browser, WhatsApp-style (only with `wabot serve --demo`).

A message from the page takes Twilio's path: the server signs it with the demo's auth token and posts it to the
bot's own /whatsapp, like `wabot send`. The TwiML reply (answer, holding reply, apology) comes back on that
request; follow-ups are read from the demo's Twilio sink and streamed to the page as server-sent events, per user,
in the order the sink accepted them. Each bubble carries its timing ("answered inline in 2.1 s", "holding reply at
8.0 s → answer at 23.4 s") and, for an answer, the tools it used: the demo's simulator keeps which tool calls it
asked for in each user turn (OpenAISimulator.tools_used), looked up by the message sent and the answer's text.

Media (the attach and record buttons): the page posts the files with the caption to /demo/send_media; each is
stored in the demo's Twilio sink under one MM… message and the signed form carries NumMedia/MediaUrl{N}/
MediaContentType{N}, as Twilio's would. The user's bubble shows them (image thumbnail, audio player, document
name), loaded through /demo/media/{MediaSid}, which fetches them back from the sink with the account's
credentials (the sink's URLs need Basic auth, which a page cannot send).

WhatsApp's read ticks and "typing…" come from the typing indicators the bot sends to the demo's sink: the page polls
/demo/typing, which says whether the sink holds a live indicator for the user and which of their messages got one.

Which sent message a follow-up answers is not written on it (Twilio's REST API carries no reference to the
inbound message). The bot answers each user's messages in order, so a follow-up goes to the oldest of the user's
messages still owed one; a split answer's parts go to the same message. A part shorter than a quarter of Twilio's
limit is always the last of its answer (bot/splitting.py cuts no earlier than a third of the way); after a longer
part, the next one counts as the same answer when nothing else is owed or it came within BURST_S.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode
from xml.etree import ElementTree

import httpx2
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from twilio.request_validator import RequestValidator

from bot.demo.inbound_form import MAX_MEDIA, inbound_form, new_message_sid
from bot.demo.media_types import content_type, message_type
from bot.settings import Settings
from bot.splitting import TWILIO_MAX_CHARS, split_message
from bot.tls import tls_context

if TYPE_CHECKING:
    from bot.demo.runner import Demo

PHONE = r"^\+[1-9][0-9]{6,14}$"  # E.164, as the page and the webhook want it
BURST_S = 1.0  # parts of one answer leave back to back
KEEPALIVE_S = 15.0
_CONTINUES_FROM = TWILIO_MAX_CHARS // 4
STATIC = Path(__file__).parent / "static"
_ASSETS = {"chat.js": "text/javascript", "chat.css": "text/css"}
MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # one attachment from the page: twice the bot's default cap, to show "too large"
MODE_CHOICES = {
    "normal": "normal: answers in 1–4 s, a few slow or failing",
    "slow": "slow model: 12–25 s per answer",
    "failing": "failing model: every call fails",
    "instant": "instant model",
}


@dataclass(frozen=True)
class Attachment:
    """A file the page sent: its bytes, content type (from the bytes) and name."""

    data: bytes
    content_type: str
    name: str


@dataclass
class _Sent:
    """A message the page sent, and how far its reply has got."""

    id: int
    t0: float  # time.monotonic(), comparable with the in-process sink's timestamps
    text: str = ""
    holding: bool = False
    reply_label: str = ""  # e.g. "holding reply at 8.0 s"
    parts: int = 0  # follow-up parts received
    last_at: float = 0.0
    last_len: int = 0


class Conversation:
    """One user's events (their messages, the bot's replies and follow-ups), append-only, numbered from 1."""

    def __init__(self, user: str, tools_used: Callable[[str, str], list[str]] | None = None) -> None:
        self.user = user
        self._tools_used = tools_used  # (message sent, answer) -> the tools the answer used
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self._owed: list[_Sent] = []  # messages that may still get a follow-up, oldest first
        self.message_ids: dict[str, int] = {}  # inbound MessageSid -> the id of the user's event
        self._current: _Sent | None = None  # the message the last follow-up went to

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def _append(self, event: dict[str, Any]) -> dict[str, Any]:
        event["id"] = len(self.events) + 1
        self.events.append(event)
        self.notify()
        return event

    def sent(self, text: str, media: list[dict[str, Any]] | None = None) -> _Sent:
        event: dict[str, Any] = {"role": "user", "text": text, "meta": time.strftime("%H:%M:%S")}
        if media:
            event["media"] = media  # each: url (on this page's server), type, kind, name, bytes
        event = self._append(event)
        sent = _Sent(id=event["id"], t0=time.monotonic(), text=text)
        self._owed.append(sent)
        return sent

    def replied(self, sent: _Sent, parts: list[str], elapsed: float, kind: str) -> None:
        """The webhook's TwiML came back after `elapsed` seconds; `kind` says what its parts are."""
        if kind in ("holding", "busy"):
            sent.holding = True
            sent.reply_label = f"{'holding' if kind == 'holding' else 'busy'} reply at {elapsed:.1f} s"
        elif sent in self._owed:
            self._owed.remove(sent)
        if not parts:
            self.notice(sent, "no reply (a duplicate, or over the per-user rate limit)")
        for i, part in enumerate(parts, 1):
            meta = {
                "answer": f"answered inline in {elapsed:.1f} s",
                "apology": f"apology at {elapsed:.1f} s",
                "notice": f"reply at {elapsed:.1f} s",
            }.get(kind, sent.reply_label)
            if len(parts) > 1:
                meta += f" · part {i}/{len(parts)}"
            event = {"role": "bot", "text": part, "meta": meta, "kind": kind, "reply_to": sent.id}
            if kind == "answer" and i == 1:
                self._add_tools(event, sent)
            self._append(event)

    def notice(self, sent: _Sent | None, text: str) -> None:
        if sent is not None and sent in self._owed:
            self._owed.remove(sent)
        self._append({"role": "system", "text": text, "meta": "", "reply_to": sent.id if sent else None})

    def followup(self, text: str, at: float, apology: bool) -> None:
        """A message the sink accepted for this user at `at` (time.monotonic())."""
        sent = self._attribute(at)
        what = "apology" if apology else "answer"
        if sent is None:
            meta = f"follow-up {what} (to a message not sent from this page)"
        else:
            sent.parts += 1
            sent.last_at, sent.last_len = at, len(text)
            meta = f"{sent.reply_label or 'holding reply'} → {what} at {at - sent.t0:.1f} s"
            if sent.parts > 1:
                meta += f" · part {sent.parts}"
        event = {"role": "bot", "text": text, "meta": meta, "kind": what, "reply_to": sent.id if sent else None}
        if sent is not None and what == "answer" and sent.parts == 1:
            self._add_tools(event, sent)
        self._append(event)

    def _add_tools(self, event: dict[str, Any], sent: _Sent) -> None:
        """Name the tools the answer (its first part) used, for the bubble's small print."""
        tools = self._tools_used(sent.text, _model_answer(event["text"])) if self._tools_used else []
        if tools:
            event["tools"] = tools

    def _attribute(self, at: float) -> _Sent | None:
        current = self._current
        may_continue = current is not None and current.last_len >= _CONTINUES_FROM
        if current is not None and may_continue and (not self._owed or at - current.last_at <= BURST_S):
            return current
        if not self._owed:
            return None
        self._current = self._owed.pop(0)
        return self._current


class _SendBody(BaseModel):
    user: str = Field(pattern=PHONE)
    text: str = Field(min_length=1, max_length=4096)


class _ModeBody(BaseModel):
    mode: str


class ChatHub:
    """The chat page's server side: the users' conversations, fed by the page's sends and the demo's sink."""

    def __init__(self, settings: Settings, demo: Demo) -> None:
        self._settings = settings
        self._demo = demo
        self.conversations: dict[str, Conversation] = {}
        self._kinds = {
            "holding": split_message(settings.holding_message),
            "busy": split_message(settings.busy_message),
            "apology": split_message(settings.apology_message),
            "notice": split_message(settings.rate_limit_message),
        }
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx2.AsyncClient | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._media: dict[str, tuple[str, str]] = {}  # MediaSid -> (the sink's MediaUrl, content type)

    # -- lifecycle (the app's lifespan)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._client = httpx2.AsyncClient(timeout=self._settings.reply_timeout + 10.0, verify=tls_context())
        self._watcher = threading.Thread(target=self._watch_sink, name="chat-sink-watcher", daemon=True)
        self._watcher.start()

    async def stop(self) -> None:
        self._stop.set()
        self.close_streams()
        if self._client is not None:
            await self._client.aclose()

    def close_streams(self) -> None:
        """End every event stream (thread- and signal-safe)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._close_streams)

    def _close_streams(self) -> None:
        self._closing = True
        for conversation in self.conversations.values():
            conversation.notify()

    # -- conversations

    def conversation(self, user: str) -> Conversation:
        if user not in self.conversations:
            self.conversations[user] = Conversation(user, self._demo.simulator.tools_used)
        return self.conversations[user]

    def _kind(self, parts: list[str]) -> str:
        return next((kind for kind, known in self._kinds.items() if parts == known), "answer")

    async def send(self, user: str, text: str, media: Sequence[Attachment] = ()) -> None:
        """Post `text` (and `media`, stored in the sink) from `user` to the bot's /whatsapp, signed as Twilio signs
        it; record what came back."""
        assert self._client is not None, "the chat hub is not started"
        settings = self._settings
        conversation = self.conversation(user)
        sid = new_message_sid(media=bool(media))
        stored = [await self._store(item, sid) for item in media]
        form = inbound_form(
            text,
            sender=user,
            to=settings.twilio_whatsapp_from or "",
            account_sid=settings.twilio_account_sid or "",
            sid=sid,
            profile_name="chat page",
            media=[(url, item.content_type) for url, item in zip(stored, media, strict=True)],
        )
        url = f"{settings.public_url}/whatsapp"
        signature = RequestValidator(settings.secret("twilio_auth_token")).compute_signature(url, form)
        headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature}
        shown = [
            {
                "url": f"/demo/media/{url.rsplit('/', 1)[-1]}",
                "type": item.content_type,
                "kind": message_type([item.content_type]),
                "name": item.name,
                "bytes": len(item.data),
            }
            for url, item in zip(stored, media, strict=True)
        ]
        sent = conversation.sent(text, shown)
        conversation.message_ids[form["MessageSid"]] = sent.id
        self._demo.sink.inbound(form["MessageSid"], form["From"])  # as Twilio knows who sent it
        try:
            response = await self._client.post(url, content=urlencode(form), headers=headers)
        except httpx2.HTTPError as exc:
            conversation.notice(sent, f"could not reach the bot: {exc.__class__.__name__}")
            return
        elapsed = time.monotonic() - sent.t0
        if response.status_code != 200:
            conversation.notice(sent, f"the webhook answered HTTP {response.status_code}: {response.text[:200]}")
            return
        parts = [m.text or "" for m in ElementTree.fromstring(response.text).iter("Message")]
        if parts:
            self._demo.sink.replied(form["From"])  # Twilio sends the TwiML reply: "typing…" ends
        conversation.replied(sent, parts, elapsed, self._kind(parts))

    async def _store(self, item: Attachment, sid: str) -> str:
        """Store one attachment in the demo's Twilio sink under message `sid`; its MediaUrl."""
        # The sink starts its media storage's listener on first use: not on this event loop.
        url = await asyncio.to_thread(self._demo.sink.add_media, item.data, item.content_type, message_sid=sid)
        self._media[url.rsplit("/", 1)[-1]] = (url, item.content_type)
        return url

    async def media(self, media_sid: str) -> tuple[bytes, str] | None:
        """An attachment sent from the page, fetched back from the sink as the bot fetches it; None if unknown."""
        assert self._client is not None, "the chat hub is not started"
        known = self._media.get(media_sid)
        if known is None:
            return None
        url, kind = known
        auth = (self._settings.twilio_account_sid or "", self._settings.secret("twilio_auth_token"))
        response = await self._client.get(url, auth=auth, follow_redirects=True)
        if response.status_code != 200:
            return None
        return response.content, kind

    def _on_sink(self, messages: list[dict[str, Any]]) -> None:
        apology = self._kinds["apology"]
        for message in messages:
            user = str(message["to"]).removeprefix("whatsapp:")
            self.conversation(user).followup(message["body"], message["at"], [message["body"]] == apology)

    def _watch_sink(self) -> None:
        """Hand every message the sink accepts to the event loop, in the sink's order (wakes on each message)."""
        sink = self._demo.sink
        seen: set[str] = set()
        count = 0
        while not self._stop.is_set():
            try:
                messages = sink.wait_for_messages(count + 1, timeout=1.0)
            except TimeoutError:
                if len(sink.messages()) < count:  # someone cleared the sink (DELETE /_sink/messages)
                    count = 0
                continue
            count = len(messages)
            new = [m for m in messages if m["sid"] not in seen]
            seen.update(m["sid"] for m in new)
            try:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._on_sink, new)
            except RuntimeError:  # the loop is closed: the app has stopped
                return

    async def stream(self, user: str, after: int) -> AsyncIterator[str]:
        """Server-sent events: the conversation's events after number `after`, then each new one as it happens."""
        conversation = self.conversation(user)
        yield "retry: 1000\n\n"
        while not self._closing:
            while after < len(conversation.events):
                event = conversation.events[after]
                after += 1
                yield f"id: {event['id']}\ndata: {json.dumps(event)}\n\n"
            changed = conversation.changed
            try:
                await asyncio.wait_for(changed.wait(), KEEPALIVE_S)
            except TimeoutError:
                yield ": keepalive\n\n"

    def typing(self, user: str) -> dict[str, Any]:
        """What `user`'s WhatsApp shows of the bot's typing indicators, as the demo's sink holds them: "typing…"
        (`typing`) and which of their messages are read (`read`, event ids)."""
        conversation = self.conversation(user)
        state = self._demo.sink.typing(f"whatsapp:{user}")
        read = [conversation.message_ids[sid] for sid in state["read"] if sid in conversation.message_ids]
        return {"typing": state["typing"], "read": read}

    # -- the simulator knob

    @property
    def mode(self) -> str:
        return self._demo.simulator.mode

    def set_mode(self, mode: str) -> None:
        if mode not in MODE_CHOICES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODE_CHOICES)}")
        self._demo.simulator.set_mode(mode)


# ---------------------------------------------------------------------------------------------------- routes

router = APIRouter()


def _hub(request: Request) -> ChatHub:
    hub: ChatHub = request.app.state.chat
    return hub


@router.get("/", response_class=HTMLResponse)
async def chat_page(request: Request) -> HTMLResponse:
    """The chat page, rendered with the simulator's current mode and the reply deadline."""
    hub = _hub(request)
    options = "".join(
        f'<option value="{mode}"{" selected" if mode == hub.mode else ""}>{label}</option>'
        for mode, label in MODE_CHOICES.items()
    )
    page = Template((STATIC / "chat.html").read_text(encoding="utf-8")).substitute(
        mode_options=options, deadline=f"{request.app.state.settings.reply_timeout:g}"
    )
    return HTMLResponse(page, headers={"Cache-Control": "no-store"})


@router.get("/demo/static/{name}")
async def asset(name: str) -> Response:
    if name not in _ASSETS:
        raise HTTPException(404)
    return FileResponse(STATIC / name, media_type=_ASSETS[name])


@router.post("/demo/send")
async def send(body: _SendBody, request: Request) -> JSONResponse:
    """Send one message; returns once the webhook answered (the page shows it from the event stream)."""
    await _hub(request).send(body.user, body.text)
    return JSONResponse({"ok": True})


@router.post("/demo/send_media")
async def send_media(request: Request) -> JSONResponse:
    """Send files (the attach and record buttons) with an optional caption: multipart `user`, `text`, `media`."""
    async with request.form(max_files=MAX_MEDIA, max_fields=10) as form:
        user, text = form.get("user"), form.get("text") or ""
        files = [f for f in form.getlist("media") if isinstance(f, UploadFile)]
        if not isinstance(user, str) or not re.fullmatch(PHONE, user):
            raise HTTPException(422, "user must be a phone number in international form, e.g. +15551234567")
        if not isinstance(text, str) or len(text) > 4096:
            raise HTTPException(422, "text must be at most 4096 characters")
        if not 1 <= len(files) <= MAX_MEDIA:
            raise HTTPException(422, f"send 1 to {MAX_MEDIA} files as 'media'")
        media = []
        for upload in files:
            data = await upload.read(MAX_UPLOAD_BYTES + 1)
            if len(data) > MAX_UPLOAD_BYTES:
                raise HTTPException(413, f"{upload.filename}: over {MAX_UPLOAD_BYTES // (1024 * 1024)} MiB")
            name = upload.filename or "attachment"
            media.append(Attachment(data, content_type(name, data), name))
    await _hub(request).send(user, text, media)
    return JSONResponse({"ok": True})


@router.get("/demo/media/{media_sid}")
async def media(media_sid: str, request: Request) -> Response:
    """An attachment sent from the page (for its bubble's thumbnail, player or link)."""
    found = await _hub(request).media(media_sid)
    if found is None:
        raise HTTPException(404)
    data, kind = found
    headers = {"Cache-Control": "private, max-age=3600", "Accept-Ranges": "bytes"}
    # The page's audio player reads the end of a voice note for its duration and seeks: byte ranges, one at a time.
    wanted = re.fullmatch(r"bytes=(\d*)-(\d*)", request.headers.get("range", "").strip())
    if wanted and (wanted.group(1) or wanted.group(2)) and data:
        first, last = wanted.group(1), wanted.group(2)
        start = int(first) if first else max(0, len(data) - int(last))
        end = min(int(last), len(data) - 1) if first and last else len(data) - 1
        if start >= len(data) or start > end:
            return Response(status_code=416, headers={"Content-Range": f"bytes */{len(data)}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return Response(data[start : end + 1], status_code=206, media_type=kind, headers=headers)
    return Response(data, media_type=kind, headers=headers)


@router.get("/demo/events")
async def events(request: Request, user: str = Query(pattern=PHONE)) -> StreamingResponse:
    last = request.headers.get("last-event-id", "")
    after = int(last) if last.isdigit() else 0  # EventSource reconnects where it left off
    return StreamingResponse(
        _hub(request).stream(user, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store"},
    )


@router.get("/demo/sink")
async def sink_url(request: Request) -> dict[str, str | None]:
    """Where the demo's Twilio sink listens: `wabot send --media` stores its files there."""
    return {"url": request.app.state.settings.twilio_api_url}


@router.get("/demo/typing")
async def typing(request: Request, user: str = Query(pattern=PHONE)) -> dict[str, Any]:
    return _hub(request).typing(user)


@router.get("/demo/users")
async def users(request: Request) -> list[str]:
    return sorted(user for user, c in _hub(request).conversations.items() if c.events)


@router.get("/demo/mode")
async def get_mode(request: Request) -> dict[str, str]:
    return {"mode": _hub(request).mode}


@router.post("/demo/mode")
async def post_mode(body: _ModeBody, request: Request) -> dict[str, str]:
    hub = _hub(request)
    try:
        hub.set_mode(body.mode)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    return {"mode": hub.mode}


def _model_answer(text: str) -> str:
    """The model's answer in a reply: without the lines bot/replies.py puts above it for attachments (what a voice
    note was heard as, what could not be read), a paragraph of their own."""
    head, blank, rest = text.partition("\n\n")
    if blank and all(line.startswith(('🎤 "', "⚠️ ")) for line in head.splitlines()):
        return rest
    return text


__all__ = ["PHONE", "Attachment", "ChatHub", "Conversation", "router"]
