"""Text as it may leave the bot: without the characters XML 1.0 forbids.

A model can answer with control characters (an ANSI escape, a form feed, a NUL) or a lone surrogate. In TwiML they
make the document invalid XML, which Twilio cannot read; through the REST API they reach the user as garbage. Both
ways out strip them: everything below U+0020 except tab, newline and carriage return, the surrogates, U+FFFE and
U+FFFF.
"""

from __future__ import annotations

import re

_FORBIDDEN = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_safe(text: str) -> str:
    """`text` without the characters XML 1.0 does not allow."""
    return _FORBIDDEN.sub("", text)
