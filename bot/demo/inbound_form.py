"""The form Twilio posts for an inbound WhatsApp message, for `wabot send`, the demo and the tests."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from bot.demo.media_types import message_type

MAX_MEDIA = 10  # Twilio's limit of media on one message


def new_message_sid(*, media: bool = False) -> str:
    """A message SID: ``MM…`` for a message with media, ``SM…`` for text, as Twilio numbers them."""
    return ("MM" if media else "SM") + secrets.token_hex(16)


def inbound_form(
    body: str,
    *,
    sender: str,
    to: str,
    account_sid: str,
    sid: str | None = None,
    profile_name: str = "Test",
    media: Sequence[tuple[str, str]] = (),
) -> dict[str, str]:
    """The fields of a real inbound message, as Twilio's WhatsApp webhook sends them; `sender` as +E.164.

    `media`: (MediaUrl, content type) of each attachment, at most ten, in order (NumMedia, MediaUrl{N},
    MediaContentType{N}, and the MessageType the first one decides).
    """
    if len(media) > MAX_MEDIA:
        raise ValueError(f"at most {MAX_MEDIA} media on one message, got {len(media)}")
    sender = sender.removeprefix("whatsapp:")
    sid = sid or new_message_sid(media=bool(media))
    form = {
        "MessageSid": sid,
        "SmsMessageSid": sid,
        "SmsSid": sid,
        "AccountSid": account_sid,
        "From": f"whatsapp:{sender}",
        "To": to,
        "Body": body,
        "NumMedia": str(len(media)),
        "NumSegments": "1",
        "MessageType": message_type([kind for _, kind in media]),
        "SmsStatus": "received",
        "WaId": sender.lstrip("+"),
        "ProfileName": profile_name,
        "ApiVersion": "2010-04-01",
    }
    for i, (url, kind) in enumerate(media):
        form[f"MediaContentType{i}"] = kind
        form[f"MediaUrl{i}"] = url
    return form
