"""Audio as the demo's OpenAI simulator reads it, and the demo's own sample voice notes.

The simulator does not decode speech. It needs three things from an uploaded audio file: whether the bytes are the
container the file name says (the real API refuses a mismatch), how long the audio lasts (latency and usage grow
with it) and what to "hear" (the transcript). `voice_note()` writes a small, valid Ogg/Opus file (silence) that
carries its transcript, for the demo and the tests.

Duration: Ogg (Opus or Vorbis) from the last page's granule position (Opus: 48 kHz samples minus the pre-skip);
WAV from its header (data size / byte rate); WebM from the largest cluster + block timecode; anything else from
its size at a typical bitrate per format (`_BYTES_PER_SECOND`).

Transcript: an Ogg file's `TRANSCRIPT=` comment (OpusTags / Vorbis comment header), else a line
``TRANSCRIPT: <text>`` anywhere in the bytes (up to a newline, a NUL or the end, at most 2,000 characters).
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["FORMATS", "AudioInfo", "InvalidFormat", "UnrecognizedFormat", "inspect", "voice_note"]

# The extensions OpenAI's transcription endpoint accepts, in the order its error message lists them.
FORMATS = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm")

_MAX_TRANSCRIPT_CHARS = 2_000
_MARKER_RE = re.compile(rb"TRANSCRIPT:[ \t]*([^\n\r\x00]{0,%d})" % _MAX_TRANSCRIPT_CHARS)
# Typical bitrates when the container gives no duration cheaply: WhatsApp-like voice notes and common encoders.
_BYTES_PER_SECOND = {
    "flac": 100_000,  # ~800 kbit/s, 44.1 kHz stereo lossless
    "m4a": 16_000,  # 128 kbit/s AAC
    "mp4": 16_000,
    "mp3": 16_000,
    "mpeg": 16_000,
    "mpga": 16_000,
    "oga": 2_000,  # 16 kbit/s Opus, what WhatsApp records
    "ogg": 2_000,
    "wav": 32_000,  # 16 kHz mono 16-bit
    "webm": 4_000,  # 32 kbit/s Opus, what Chrome's MediaRecorder records
}
_OPUS_RATE = 48_000
_SILENT_OPUS_FRAME = b"\xf8\xff\xfe"  # a CELT 20 ms frame that decodes to silence
_FRAME_SAMPLES = 960  # 20 ms at 48 kHz
_PRE_SKIP = 312


class UnrecognizedFormat(ValueError):
    """The file name has no extension the endpoint knows."""


class InvalidFormat(ValueError):
    """The bytes are not the container the file name says."""


@dataclass(frozen=True)
class AudioInfo:
    """What the simulator learnt from one audio file."""

    format: str  # the file name's extension, one of FORMATS
    seconds: float  # the audio's duration, measured or estimated
    measured: bool  # True when read from the container, False when estimated from the size
    transcript: str | None  # the transcript the file carries, if any


def inspect(filename: str, data: bytes) -> AudioInfo:
    """Check `data` against the container `filename` names; its duration and carried transcript.

    Raises UnrecognizedFormat or InvalidFormat as the real endpoint refuses such files.
    """
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    if ext not in FORMATS:
        raise UnrecognizedFormat(ext)
    if not _magic_ok(ext, data):
        raise InvalidFormat(ext)
    seconds: float | None = None
    transcript: str | None = None
    if ext in ("ogg", "oga"):
        seconds, transcript = _ogg(data)
    elif ext == "wav":
        seconds = _wav_seconds(data)
    elif ext == "webm":
        seconds = _webm_seconds(data)
    measured = seconds is not None
    if seconds is None:
        seconds = len(data) / _BYTES_PER_SECOND[ext]
    if transcript is None:
        match = _MARKER_RE.search(data)
        if match:
            transcript = match.group(1).decode("utf-8", "replace").strip()
    return AudioInfo(ext, max(0.0, seconds), measured, transcript)


def _magic_ok(ext: str, data: bytes) -> bool:
    if ext in ("ogg", "oga"):
        return data.startswith(b"OggS")
    if ext == "wav":
        return data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    if ext == "flac":
        return data.startswith(b"fLaC")
    if ext in ("mp3", "mpeg", "mpga"):
        return data.startswith(b"ID3") or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)
    if ext in ("mp4", "m4a"):
        return data[4:8] == b"ftyp"
    return data.startswith(b"\x1a\x45\xdf\xa3")  # webm: an EBML header


# ---------------------------------------------------------------- Ogg


def _ogg_pages(data: bytes) -> Iterator[tuple[int, int, list[bytes], bool]]:
    """(granule position, serial, packet pieces, last piece continues on the next page) of each page."""
    pos = 0
    while pos + 27 <= len(data) and data[pos : pos + 4] == b"OggS":
        granule, serial = struct.unpack_from("<qI", data, pos + 6)
        count = data[pos + 26]
        table = data[pos + 27 : pos + 27 + count]
        body = pos + 27 + count
        pieces: list[bytes] = []
        start = body
        size = 0
        for lace in table:
            size += lace
            if lace < 255:
                pieces.append(data[start : start + size])
                start += size
                size = 0
        open_end = size > 0 or (len(table) > 0 and table[-1] == 255)
        if open_end:
            pieces.append(data[start : start + size])
        yield granule, serial, pieces, open_end
        pos = body + sum(table)


def _ogg(data: bytes) -> tuple[float | None, str | None]:
    packets: list[bytes] = []
    partial = b""
    last_granule = -1
    for granule, _serial, pieces, open_end in _ogg_pages(data):
        for i, piece in enumerate(pieces):
            partial += piece
            if not (open_end and i == len(pieces) - 1):
                if len(packets) < 2:  # only the two header packets are needed
                    packets.append(partial)
                partial = b""
        if granule >= 0:
            last_granule = granule
    transcript: str | None = None
    seconds: float | None = None
    if packets and packets[0].startswith(b"OpusHead") and len(packets[0]) >= 19:
        pre_skip = struct.unpack_from("<H", packets[0], 10)[0]
        if last_granule >= 0:
            seconds = max(0, last_granule - pre_skip) / _OPUS_RATE
        if len(packets) > 1 and packets[1].startswith(b"OpusTags"):
            transcript = _comment(packets[1][8:], "TRANSCRIPT")
    elif packets and packets[0].startswith(b"\x01vorbis") and len(packets[0]) >= 16:
        rate = struct.unpack_from("<I", packets[0], 12)[0]
        if last_granule >= 0 and rate:
            seconds = last_granule / rate
        if len(packets) > 1 and packets[1].startswith(b"\x03vorbis"):
            transcript = _comment(packets[1][7:], "TRANSCRIPT")
    return seconds, transcript


def _comment(block: bytes, field: str) -> str | None:
    """The value of `field` in a Vorbis comment block (vendor string, then length-prefixed KEY=value comments)."""
    try:
        (vendor_len,) = struct.unpack_from("<I", block, 0)
        pos = 4 + vendor_len
        (count,) = struct.unpack_from("<I", block, pos)
        pos += 4
        for _ in range(min(count, 1000)):
            (length,) = struct.unpack_from("<I", block, pos)
            pos += 4
            key, sep, value = block[pos : pos + length].decode("utf-8", "replace").partition("=")
            pos += length
            if sep and key.upper() == field:
                return value[:_MAX_TRANSCRIPT_CHARS].strip()
    except struct.error:
        return None
    return None


# ---------------------------------------------------------------- WAV and WebM


def _wav_seconds(data: bytes) -> float | None:
    pos = 12
    byte_rate = 0
    while pos + 8 <= len(data):
        chunk, size = struct.unpack_from("<4sI", data, pos)
        if chunk == b"fmt " and size >= 16:
            byte_rate = struct.unpack_from("<I", data, pos + 16)[0]
        elif chunk == b"data":
            # A streamed WAV may say 0 or 0xFFFFFFFF: the bytes present are what counts.
            size = min(size, len(data) - pos - 8)
            return size / byte_rate if byte_rate else None
        pos += 8 + size + (size & 1)
    return None


_EBML_MASTERS = {0x18538067, 0x1F43B675, 0x1549A966, 0xA0}  # Segment, Cluster, Info, BlockGroup: descended into


def _vint(data: bytes, pos: int, *, keep_marker: bool) -> tuple[int, int]:
    """An EBML variable-length integer at `pos`: (value, length). IDs keep their length marker, sizes drop it."""
    first = data[pos]
    length = 1
    while length <= 8 and not first & (0x80 >> (length - 1)):
        length += 1
    if length > 8 or pos + length > len(data):
        raise ValueError("bad EBML integer")
    value = first if keep_marker else first & (0xFF >> length)
    for b in data[pos + 1 : pos + length]:
        value = (value << 8) | b
    return value, length


def _webm_seconds(data: bytes) -> float | None:
    """The end of the last block: cluster timecode + block offset, in the segment's timecode scale.

    Browsers' MediaRecorder writes no Duration (the recording is a live stream), so the timecodes are the truth.
    """
    scale = 1_000_000  # ns per timecode unit, the default
    cluster = 0
    latest: int | None = None
    pos = 0
    try:
        while pos < len(data):
            element, id_len = _vint(data, pos, keep_marker=True)
            size, size_len = _vint(data, pos + id_len, keep_marker=False)
            body = pos + id_len + size_len
            unknown_size = size == (1 << (7 * size_len)) - 1
            if element in _EBML_MASTERS:
                pos = body
                continue
            if unknown_size:
                return None
            if element == 0x2AD7B1:  # TimecodeScale
                scale = int.from_bytes(data[body : body + size], "big") or scale
            elif element == 0xE7:  # a Cluster's Timecode
                cluster = int.from_bytes(data[body : body + size], "big")
            elif element in (0xA3, 0xA1) and size >= 4:  # SimpleBlock or Block: track vint, int16 offset, flags
                _track, track_len = _vint(data, body, keep_marker=False)
                (offset,) = struct.unpack_from(">h", data, body + track_len)
                latest = max(latest or 0, cluster + offset)
            pos = body + size
    except (ValueError, IndexError, struct.error):
        pass
    if latest is None:
        return None
    return latest * scale / 1e9 + 0.02  # the last block's own length: one 20 ms Opus frame


# ---------------------------------------------------------------- writing a sample voice note


def _crc32_ogg(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def _page(packets: list[bytes], *, granule: int, serial: int, sequence: int, flags: int) -> bytes:
    table = bytearray()
    for packet in packets:
        table += b"\xff" * (len(packet) // 255) + bytes([len(packet) % 255])
    header = struct.pack("<4sBBqIIIB", b"OggS", 0, flags, granule, serial, sequence, 0, len(table)) + table
    page = header + b"".join(packets)
    crc = _crc32_ogg(page)
    return page[:22] + struct.pack("<I", crc) + page[26:]


def voice_note(transcript: str | None, seconds: float = 3.0, *, serial: int = 0x77AB07) -> bytes:
    """A valid mono Ogg/Opus file of `seconds` of silence whose OpusTags carry ``TRANSCRIPT=<transcript>``.

    Deterministic (same arguments, same bytes) and small (about 150 bytes a second): what the demo's
    `wabot send --media` sample and the tests send as a WhatsApp voice note.
    """
    head = struct.pack("<8sBBHIhB", b"OpusHead", 1, 1, _PRE_SKIP, _OPUS_RATE, 0, 0)
    comments = [f"TRANSCRIPT={transcript}".encode()] if transcript is not None else []
    vendor = b"wabot demo"
    tags = b"OpusTags" + struct.pack("<I", len(vendor)) + vendor + struct.pack("<I", len(comments))
    tags += b"".join(struct.pack("<I", len(c)) + c for c in comments)
    # Granule positions count decoded samples, the pre-skip included; the last page's trims the end (RFC 7845).
    samples = max(1, round(seconds * _OPUS_RATE))
    frames = math.ceil((samples + _PRE_SKIP) / _FRAME_SAMPLES)
    pages = [
        _page([head], granule=0, serial=serial, sequence=0, flags=0x02),
        _page([tags], granule=0, serial=serial, sequence=1, flags=0x00),
    ]
    per_page = 50  # one second of 20 ms frames per page
    done = 0
    while done < frames:
        n = min(per_page, frames - done)
        done += n
        last = done == frames
        pages.append(
            _page(
                [_SILENT_OPUS_FRAME] * n,
                granule=_PRE_SKIP + samples if last else done * _FRAME_SAMPLES,
                serial=serial,
                sequence=len(pages),
                flags=0x04 if last else 0x00,
            )
        )
    return b"".join(pages)
