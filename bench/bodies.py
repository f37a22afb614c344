"""Signed webhook bodies, made before the timed section so signing is never part of a measurement.

Every body carries its own MessageSid (a repeated one would be answered as a duplicate) and its own sender
(one user's messages wait for each other, which is ordering, not speed).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from urllib.parse import urlencode

from twilio.request_validator import RequestValidator

from bench.config import ACCOUNT_SID, AUTH_TOKEN, BOT_NUMBER
from bot.demo.inbound_form import inbound_form

_VALIDATOR = RequestValidator(AUTH_TOKEN)


def new_run() -> str:
    """A tag that keeps one run's MessageSids apart from every other run's (8 hex digits)."""
    return secrets.token_hex(4)


def signed_body(i: int, text: str, public_url: str, run: str) -> tuple[str, str]:
    """(X-Twilio-Signature, urlencoded form) of message `i` of run `run`, posted to `public_url`/whatsapp."""
    sid = f"SM{run}{i:024x}"
    # +1 555 then 8 digits: a distinct, well-formed sender per message.
    form = inbound_form(text, sender=f"+1555{i % 10**8:08d}", to=BOT_NUMBER, account_sid=ACCOUNT_SID, sid=sid)
    return _VALIDATOR.compute_signature(f"{public_url}/whatsapp", form), urlencode(form)


def write_bodies(path: Path, count: int, text: str, public_url: str) -> Path:
    """Write one `signature<TAB>body` line per message, for the wrk script; each file is a run of its own."""
    run = new_run()
    with path.open("w", encoding="ascii") as out:
        for i in range(count):
            signature, body = signed_body(i, text, public_url, run)
            out.write(f"{signature}\t{body}\n")
    return path
