"""What a file is, as WhatsApp and Twilio label it: a content type from its first bytes (or name) and the inbound
webhook's MessageType, for `wabot send --media` and the chat page's attachments."""

from __future__ import annotations

import mimetypes

__all__ = ["content_type", "message_type"]

_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"OggS", 0, "audio/ogg"),
    (b"ID3", 0, "audio/mpeg"),
    (b"fLaC", 0, "audio/flac"),
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"GIF8", 0, "image/gif"),
    (b"%PDF-", 0, "application/pdf"),
)


def content_type(name: str, data: bytes) -> str:
    """The content type of `data` from its magic bytes; the file name's guess when the bytes do not say."""
    for magic, offset, kind in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "audio/wav"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:8] == b"ftyp":
        return "audio/mp4" if data[8:11] == b"M4A" else "video/mp4"
    if len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:
        return "audio/mpeg"
    if data[:4] == b"\x1a\x45\xdf\xa3":  # WebM: a browser's voice recording unless the name says video
        return "video/webm" if name.lower().endswith((".mkv", ".mp4")) else "audio/webm"
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"


def message_type(content_types: list[str]) -> str:
    """Twilio's WhatsApp MessageType for an inbound message with these media (the first one decides)."""
    if not content_types:
        return "text"
    kind = content_types[0].split(";")[0].strip().lower()
    if kind == "image/webp":
        return "sticker"
    major = kind.split("/")[0]
    if major in ("image", "audio", "video"):
        return major
    if kind in ("text/vcard", "text/x-vcard"):
        return "contacts"
    return "document"
