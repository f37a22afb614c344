"""An inbound Twilio WhatsApp webhook, parsed and validated into the message the bot answers.

Twilio adds form fields without notice, so unknown fields are ignored, never rejected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

_SID = re.compile(r"^[A-Z]{2}[0-9a-fA-F]{32}$")
_ADDRESS = re.compile(r"^(whatsapp:)?\+?[0-9]{5,16}$")
MAX_BODY_CHARS = 4096  # WhatsApp's own limit; Twilio never sends more


class MalformedRequest(ValueError):
    """The request cannot be a Twilio webhook; the message says why (it goes back in the 400 body)."""


def parse_form(raw: bytes) -> list[tuple[str, str]]:
    """Decode an application/x-www-form-urlencoded body, strictly UTF-8, keeping blank values."""
    try:
        text = raw.decode("utf-8")
        return parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=1000)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedRequest(f"body is not valid UTF-8 form data: {exc.__class__.__name__}") from exc


def form_dict(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """First value of each field (Twilio never repeats one)."""
    out: dict[str, str] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


@dataclass(frozen=True)
class Media:
    url: str
    content_type: str


@dataclass(frozen=True)
class InboundMessage:
    """One WhatsApp message as the bot needs it."""

    sid: str
    sender: str
    to: str
    body: str
    profile_name: str = ""
    media: tuple[Media, ...] = ()
    latitude: str = ""
    longitude: str = ""
    place: str = ""
    button_text: str = ""
    button_payload: str = ""

    @classmethod
    def from_form(cls, form: dict[str, str]) -> InboundMessage:
        """Validate the fields the bot relies on; raise MalformedRequest naming what is wrong."""
        sid = form.get("MessageSid") or form.get("SmsMessageSid") or form.get("SmsSid") or ""
        sender = form.get("From", "")
        problems = []
        if not sid:
            problems.append("MessageSid is missing")
        elif not _SID.fullmatch(sid):
            problems.append("MessageSid is not a Twilio message SID")
        if not sender:
            problems.append("From is missing")
        elif not _ADDRESS.fullmatch(sender):
            problems.append("From is not a WhatsApp address (whatsapp:+<E.164>)")
        body = form.get("Body", "")
        if len(body) > MAX_BODY_CHARS:
            problems.append(f"Body is longer than {MAX_BODY_CHARS} characters")
        try:
            num_media = int(form.get("NumMedia", "0") or "0")
        except ValueError:
            problems.append("NumMedia is not a number")
            num_media = 0
        if not 0 <= num_media <= 10:
            problems.append("NumMedia is out of range")
        if problems:
            raise MalformedRequest("; ".join(problems))
        media = tuple(
            Media(url=form.get(f"MediaUrl{i}", ""), content_type=form.get(f"MediaContentType{i}", "unknown"))
            for i in range(num_media)
        )
        return cls(
            sid=sid,
            sender=sender,
            to=form.get("To", ""),
            body=body,
            profile_name=form.get("ProfileName", ""),
            media=media,
            latitude=form.get("Latitude", ""),
            longitude=form.get("Longitude", ""),
            place=", ".join(p for p in (form.get("Label", ""), form.get("Address", "")) if p),
            button_text=form.get("ButtonText", ""),
            button_payload=form.get("ButtonPayload", ""),
        )

    def prompt(self) -> str:
        """What the model is told arrived, but for the media: bot/media.py reads those in the run."""
        lines = []
        if self.button_text or self.button_payload:
            lines.append(f"[The user tapped the quick-reply button {self.button_text or self.button_payload!r}.]")
        if self.latitude and self.longitude:
            where = f" ({self.place})" if self.place else ""
            lines.append(f"[The user shared a location: {self.latitude}, {self.longitude}{where}.]")
        if self.body.strip():
            lines.append(self.body)
        elif not lines and not self.media:
            lines.append("[The user sent an empty message. Greet them and ask how you can help.]")
        return "\n".join(lines)
