"""Downloading an inbound message's media from Twilio into memory: credentials only for Twilio, a size cap, a timeout.

Twilio serves ``MediaUrl{N}`` behind HTTP Basic auth (account SID and auth token) and answers with a redirect to its
media storage on another host. Redirects are followed here by hand (at most `MAX_REDIRECTS`) so the credentials go
only to the Twilio API origin (WABOT_TWILIO_API_URL's): a URL on any other origin is never fetched, and a redirect
to another origin is followed without them. The body is streamed and reading stops at WABOT_MAX_MEDIA_BYTES (a
Content-Length above it is refused before any byte is read). The bytes stay in memory: nothing here logs, traces or
writes them.
"""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

import aiohttp

from bot.settings import Settings

__all__ = ["MAX_REDIRECTS", "MediaFetchError", "MediaFetcher", "origin_of"]

MAX_REDIRECTS = 3
_CHUNK_BYTES = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class MediaFetchError(Exception):
    """A medium could not be downloaded. `reason` is one of: foreign_origin, not_found, too_large, http_error,
    too_many_redirects, network_error (a timeout is the caller's asyncio.timeout, seen as TimeoutError)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


def origin_of(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) with the scheme's default port filled in; None for a URL that is not http(s)."""
    try:
        parsed = urlsplit(url)
        port = parsed.port
    except ValueError:
        return None
    scheme = parsed.scheme.lower()
    if scheme not in ("http", "https") or not parsed.hostname:
        return None
    return scheme, parsed.hostname, port or (443 if scheme == "https" else 80)


class MediaFetcher:
    """Fetches media URLs of Twilio's API origin with the account's credentials; one aiohttp session, made lazily
    on the running loop."""

    def __init__(self, settings: Settings) -> None:
        self._origin = origin_of(settings.twilio_api_url)
        self._auth = aiohttp.encode_basic_auth(settings.twilio_account_sid or "", settings.secret("twilio_auth_token"))
        self.max_bytes = settings.max_media_bytes
        self._session: aiohttp.ClientSession | None = None

    def is_twilio(self, url: str) -> bool:
        """True when `url` is on the Twilio API origin, the only one the bot fetches media from."""
        return self._origin is not None and origin_of(url) == self._origin

    async def fetch(self, url: str) -> bytes:
        """The body of `url` (at most `max_bytes`), or MediaFetchError. Bound it with asyncio.timeout."""
        if not self.is_twilio(url):
            raise MediaFetchError("foreign_origin", "the media URL is not on the Twilio API origin")
        session = self._session_now()
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            # Credentials for the Twilio API origin only: never to its storage or anywhere a redirect points.
            headers = {"Authorization": self._auth} if self.is_twilio(current) else {}
            try:
                async with session.get(current, headers=headers, allow_redirects=False) as response:
                    if response.status in _REDIRECTS:
                        location = response.headers.get("Location")
                        if not location:
                            raise MediaFetchError("http_error", f"redirect {response.status} without a Location")
                        current = urljoin(current, location)
                        if origin_of(current) is None:
                            raise MediaFetchError("http_error", "redirect to a URL that is not http(s)")
                        continue
                    if response.status in (404, 410):
                        raise MediaFetchError("not_found", f"HTTP {response.status}")
                    if response.status != 200:
                        raise MediaFetchError("http_error", f"HTTP {response.status}")
                    return await self._read_capped(response)
            except aiohttp.ClientError as exc:
                raise MediaFetchError("network_error", exc.__class__.__name__) from exc
        raise MediaFetchError("too_many_redirects", f"more than {MAX_REDIRECTS} redirects")

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        if response.content_length is not None and response.content_length > self.max_bytes:
            raise MediaFetchError("too_large", f"Content-Length {response.content_length} > {self.max_bytes}")
        body = bytearray()
        async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
            body += chunk
            if len(body) > self.max_bytes:
                # Leaving the `async with` closes the connection: the rest is never read.
                raise MediaFetchError("too_large", f"more than {self.max_bytes} bytes")
        return bytes(body)

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No cookies: nothing a media host sets may travel to another request.
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
