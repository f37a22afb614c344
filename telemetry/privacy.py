"""Keyed hashing of personal identifiers and message bodies, so telemetry can correlate a user's messages
without naming them or quoting them.

A plain hash of a phone number is reversible by enumerating the number space; an HMAC with a secret key is not.
"""

from __future__ import annotations

import hashlib
import hmac

# Used only when no key is configured (demo, tests): hashes are then stable but not secret.
_FALLBACK_KEY = b"wabot-demo-hash-key"


class UserHasher:
    """Maps a phone number (or any identifier) to a short, stable, keyed hash."""

    def __init__(self, key: str | bytes | None) -> None:
        if isinstance(key, str):
            key = key.encode("utf-8")
        self._key = key or _FALLBACK_KEY

    def __call__(self, identifier: str) -> str:
        normalized = identifier.removeprefix("whatsapp:").strip()
        return hmac.new(self._key, normalized.encode("utf-8"), hashlib.sha256).hexdigest()[:16]

    def fingerprint(self, text: str) -> dict[str, int | str]:
        """Length and a short keyed digest of a message body: enough to spot repeats, not enough to read it.

        Keyed like the numbers: a plain hash of a short text is reversed by trying texts ("My code is 482913" fell
        in under a second). The field keeps its name, `sha256_8`, as logs and `wabot analyze` know it."""
        return {
            "length": len(text),
            "sha256_8": hmac.new(self._key, text.encode("utf-8"), hashlib.sha256).hexdigest()[:8],
        }
