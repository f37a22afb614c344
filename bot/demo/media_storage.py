"""Twilio's media storage on loopback: the other origin a media URL redirects to.

Twilio serves an inbound message's ``MediaUrl{N}`` behind HTTP Basic auth on its API host and answers with a
redirect to its media storage on another host, which serves the bytes to whoever holds the (unguessable) URL. The
sink (bot/demo/twilio_sink.py) answers the first part; this app, served on its own port, is the second, so a test
can see whether a client carried the account's credentials across origins. It keeps the bytes in memory, records
every fetch (with whether an Authorization header came along and how many bytes were handed out) and can be slow,
answer 404, stream without a Content-Length, or add more redirect hops.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse

__all__ = ["CHUNK_BYTES", "MediaStorage", "StoredMedia"]

# The size of each piece the storage hands to its server: a client that stops reading at its cap has been handed
# at most this much more (plus what the sockets buffer).
CHUNK_BYTES = 64 * 1024


@dataclass
class StoredMedia:
    """One uploaded medium and how the fake should misbehave when it is fetched."""

    sid: str  # the Media resource's sid, ME + 32 hex
    message_sid: str  # the message it belongs to, MM/SM + 32 hex
    data: bytes
    content_type: str
    key: str  # the storage URL's unguessable part
    created: float
    expired: bool = False  # the API answers 404, as Twilio does for deleted or expired media
    delay: float = 0.0  # seconds the storage waits before the first byte
    chunked: bool = False  # no Content-Length: the client learns the size only by reading
    hops: int = 1  # redirects from the API to the bytes (more than 1: the storage redirects to itself)


class MediaStorage:
    """The stored media (shared with the sink) and the storage app that serves them by key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._media: dict[str, StoredMedia] = {}  # by sid
        self._fetches: list[dict[str, Any]] = []
        self.app = self._build_app()

    def add(self, media: StoredMedia) -> None:
        with self._lock:
            self._media[media.sid] = media

    def get(self, sid: str) -> StoredMedia | None:
        with self._lock:
            return self._media.get(sid)

    def expire(self, sid: str) -> None:
        with self._lock:
            self._media[sid].expired = True

    def record(self, fetch: dict[str, Any]) -> dict[str, Any]:
        """Append a fetch record (the same dict is updated as bytes go out) and wake waiters."""
        with self._changed:
            self._fetches.append(fetch)
            self._changed.notify_all()
        return fetch

    def fetches(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._fetches)

    def wait_for_fetches(self, n: int, *, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Block until at least `n` fetches are recorded and every storage fetch has finished streaming."""

        def done() -> bool:
            return len(self._fetches) >= n and all(f["finished"] for f in self._fetches)

        with self._changed:
            if not self._changed.wait_for(done, timeout):
                raise TimeoutError(f"expected {n} finished media fetch(es) within {timeout}s, got {self._fetches!r}")
            return copy.deepcopy(self._fetches)

    def clear(self) -> None:
        with self._lock:
            self._media.clear()
            self._fetches.clear()

    def _finish(self, fetch: dict[str, Any], sent: int) -> None:
        with self._changed:
            fetch["bytes"] = sent
            fetch["finished"] = True
            self._changed.notify_all()

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="twilio-media-storage", docs_url=None, redoc_url=None, openapi_url=None)

        @app.get("/media/{key}")
        async def serve(key: str, request: Request, hop: int = 1) -> Response:
            with self._lock:
                media = next((m for m in self._media.values() if m.key == key), None)
            missing = media is None or media.expired
            redirect = media is not None and not missing and hop < media.hops
            fetch = self.record(
                {
                    "origin": "storage",
                    "media_sid": media.sid if media else None,
                    "authorization": "authorization" in request.headers,
                    "status": 404 if missing else 307 if redirect else 200,
                    "bytes": 0,
                    "finished": missing or redirect,
                    "at": time.monotonic(),
                }
            )
            if media is None or missing:
                return Response(status_code=404, content=b"NoSuchKey", media_type="text/plain")
            if redirect:
                return RedirectResponse(f"/media/{key}?hop={hop + 1}", status_code=307)
            return self._stream(media, fetch, request)

        return app

    def _stream(self, media: StoredMedia, fetch: dict[str, Any], request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            sent = 0
            try:
                if media.delay > 0:
                    # This sleep IS the simulated slow storage, not a wait for some condition.
                    await asyncio.sleep(media.delay)
                for start in range(0, len(media.data), CHUNK_BYTES):
                    # uvicorn drops what is sent after the client has gone: stop, as a real server would.
                    if await request.is_disconnected():
                        break
                    chunk = media.data[start : start + CHUNK_BYTES]
                    # Counted before it is handed over: the record never understates what left the storage.
                    sent += len(chunk)
                    yield chunk
            finally:
                self._finish(fetch, sent)

        headers = {} if media.chunked else {"Content-Length": str(len(media.data))}
        return StreamingResponse(body(), media_type=media.content_type, headers=headers)


def new_media(data: bytes, content_type: str, message_sid: str, **faults: Any) -> StoredMedia:
    """A StoredMedia with fresh sids and key; `faults` are StoredMedia's fault fields."""
    return StoredMedia(
        sid="ME" + uuid.uuid4().hex,
        message_sid=message_sid,
        data=data,
        content_type=content_type,
        key=uuid.uuid4().hex + uuid.uuid4().hex,
        created=time.time(),
        **faults,
    )
