"""The Responses API's `input_image` and `input_file` parts, checked and "seen" by the demo's OpenAI simulator.

A part is checked as the real API checks it (a data URL with the right MIME type and base64 bytes, a detail it
knows, a filename with file data) and refused with OpenAI's 400 messages. What the simulated model "sees" is read
from the bytes: an image's format and size (PNG, JPEG, GIF, WebP headers), a PDF's name, page count and size;
`describe` says it in one sentence, e.g. "I see a PNG image, 640x480." (with a multiplication sign) or "I got a
PDF 'report.pdf' (2 pages, 12 KB)." Token counts follow OpenAI's image rule (85 base + 170 per 512 px tile; 85 at
low detail) and about 300 tokens a PDF page.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

__all__ = ["PartError", "Seen", "describe"]

_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
_DETAILS = ("low", "high", "auto", "original")
_FILE_DETAILS = ("auto", "low", "high")
_FILE_TYPES_PREFIXES = ("text/",)
_FILE_TYPES = (
    "application/pdf",
    "application/json",
    "application/msword",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
)
_DATA_URL_RE = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),(.*)$", re.DOTALL)
_PDF_PAGE_RE = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")
_TOKENS_PER_PDF_PAGE = 300


class PartError(ValueError):
    """A part the real API refuses with 400: OpenAI's message, param and code."""

    def __init__(self, message: str, *, param: str | None, code: str | None = "invalid_value") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class Seen:
    """What the simulated model saw in one part."""

    kind: str  # "image" or "file"
    description: str  # one sentence for the answer
    tokens: int  # what the part adds to input_tokens


def _size(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MB"
    return f"{max(1, round(n / 1024))} KB"


def _data_url(value: str, param: str, what: str, example: str) -> tuple[str, bytes]:
    """(MIME type, bytes) of a base64 data URL, or OpenAI's 400 for what is wrong with it."""
    expected = f"Invalid '{param}'. Expected a base64-encoded data URL with {what} (e.g. '{example}'), but got"
    match = _DATA_URL_RE.match(value)
    if not value.startswith("data:") or match is None:
        raise PartError(f"{expected} a value without the 'data:' prefix.", param=param)
    mime, params, payload = match.group(1).lower(), match.group(2).lower(), match.group(3)
    if ";base64" not in params:
        raise PartError(f"{expected} a data URL that is not base64-encoded.", param=param)
    if not payload.strip():
        raise PartError(f"{expected} empty base64-encoded bytes.", param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise PartError(f"{expected} invalid base64-encoded bytes.", param=param) from None
    return mime, data


def image_size(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) read from an image's header; None when the bytes are no PNG, JPEG, GIF or WebP."""
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
            width, height = struct.unpack_from(">II", data, 16)
            return "PNG", width, height
        if data.startswith((b"GIF87a", b"GIF89a")):
            width, height = struct.unpack_from("<HH", data, 6)
            return "GIF", width, height
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            chunk = data[12:16]
            if chunk == b"VP8 ":
                width, height = struct.unpack_from("<HH", data, 26)
                return "WebP", width & 0x3FFF, height & 0x3FFF
            if chunk == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return "WebP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8X":
                width = int.from_bytes(data[24:27], "little") + 1
                height = int.from_bytes(data[27:30], "little") + 1
                return "WebP", width, height
            return None
        if data.startswith(b"\xff\xd8"):
            pos = 2
            while pos + 9 < len(data):
                if data[pos] != 0xFF:
                    return None
                marker = data[pos + 1]
                if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                    pos += 2
                    continue
                (length,) = struct.unpack_from(">H", data, pos + 2)
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                    height, width = struct.unpack_from(">HH", data, pos + 5)
                    return "JPEG", width, height
                pos += 2 + length
    except struct.error:
        return None
    return None


def _image_tokens(width: int, height: int, detail: str) -> int:
    if detail == "low":
        return 85
    # Fit in 2048 x 2048, then the shortest side down to 768; 170 tokens per 512 px tile, 85 base.
    scale = min(1.0, 2048 / max(width, height, 1))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / max(1.0, min(w, h)))
    w, h = w * scale, h * scale
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def _image(part: dict[str, Any], where: str) -> Seen:
    detail = part.get("detail", "auto")
    if detail not in _DETAILS:
        supported = ", ".join(f"'{d}'" for d in _DETAILS[:-1]) + f" and '{_DETAILS[-1]}'"
        raise PartError(f"Invalid value: '{detail}'. Supported values are: {supported}.", param=f"{where}.detail")
    url, file_id = part.get("image_url"), part.get("file_id")
    if url is None and file_id is None:
        raise PartError(
            f"Missing required parameter: '{where}.image_url'.",
            param=f"{where}.image_url",
            code="missing_required_parameter",
        )
    if url is None:
        return Seen("image", f"I see the uploaded image {file_id}.", 85)
    if not isinstance(url, str):
        raise PartError(f"Invalid type for '{where}.image_url': expected a string.", param=f"{where}.image_url")
    if url.startswith(("https://", "http://")):
        # The simulator makes no outside calls; the real API would download it.
        return Seen("image", f"I see an image from {url.split('/')[2]}.", 85)
    param = f"{where}.image_url"
    mime, data = _data_url(url, param, "an image MIME type", "data:image/png;base64,aW1nIGJ5dGVzIGhlcmU=")
    if not mime.startswith("image/"):
        raise PartError(
            f"Invalid '{param}'. Expected a base64-encoded data URL with an image MIME type "
            f"(e.g. 'data:image/png;base64,aW1nIGJ5dGVzIGhlcmU='), but got unsupported MIME type '{mime}'.",
            param=param,
        )
    size = image_size(data)
    if mime not in _IMAGE_TYPES or size is None:
        raise PartError(
            "The image data you provided does not represent a valid image. Please check your input and try again "
            f"with one of the supported image formats: {list(_IMAGE_TYPES)}.",
            param=param,
            code="invalid_image_format",
        )
    fmt, width, height = size
    return Seen("image", f"I see a {fmt} image, {width}×{height}.", _image_tokens(width, height, detail))


def _file(part: dict[str, Any], where: str) -> Seen:
    detail = part.get("detail", "auto")
    if detail not in _FILE_DETAILS:
        raise PartError(
            f"Invalid value: '{detail}'. Supported values are: 'auto', 'low' and 'high'.", param=f"{where}.detail"
        )
    file_data, file_id, file_url = part.get("file_data"), part.get("file_id"), part.get("file_url")
    if file_data is None:
        if file_id is not None:
            return Seen("file", f"I got the uploaded file {file_id}.", _TOKENS_PER_PDF_PAGE)
        if isinstance(file_url, str):
            return Seen("file", f"I got a file from {file_url.split('/')[2] if '//' in file_url else file_url}.", 300)
        raise PartError(
            f"Missing required parameter: '{where}.file_data'.",
            param=f"{where}.file_data",
            code="missing_required_parameter",
        )
    if not isinstance(file_data, str):
        raise PartError(f"Invalid type for '{where}.file_data': expected a string.", param=f"{where}.file_data")
    filename = part.get("filename")
    if not isinstance(filename, str) or not filename:
        raise PartError(
            f"Missing required parameter: '{where}.filename'.",
            param=f"{where}.filename",
            code="missing_required_parameter",
        )
    param = f"{where}.file_data"
    mime, data = _data_url(file_data, param, "a MIME type", "data:application/pdf;base64,SGVsbG8sIFdvcmxkIQ==")
    if mime == "application/pdf":
        if not data.startswith(b"%PDF-"):
            raise PartError(
                f"Invalid '{param}'. The file data you provided does not represent a valid PDF.",
                param=param,
                code="invalid_file",
            )
        pages = max(1, len(_PDF_PAGE_RE.findall(data)))
        noun = "page" if pages == 1 else "pages"
        return Seen("file", f"I got a PDF '{filename}' ({pages} {noun}, {_size(len(data))}).", pages * 300)
    if mime in _FILE_TYPES or mime.startswith(_FILE_TYPES_PREFIXES):
        return Seen("file", f"I got a file '{filename}' ({mime}, {_size(len(data))}).", max(1, len(data) // 4))
    raise PartError(
        f"Invalid '{param}'. Unsupported file type '{mime}' for '{filename}': the model reads PDFs, text and "
        "office documents.",
        param=param,
        code="unsupported_file",
    )


def describe(part: dict[str, Any], where: str) -> Seen:
    """Check one `input_image` or `input_file` part at `where` (e.g. "input[0].content[1]"); what it shows."""
    if part["type"] == "input_image":
        return _image(part, where)
    return _file(part, where)
