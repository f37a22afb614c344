"""The one TLS context of the process, shared by every HTTPS client the bot builds.

Building a context loads the CA bundle: about 50 ms of CPU, as much as the rest of a client's construction. A
context holds only configuration (the trusted CAs, the protocol floor) and may be shared between clients, threads
and event loops, as aiohttp shares its own default one: the bot builds it once per process, not once per client
(the OpenAI client, the demo's chat page, each CLI request).
"""

from __future__ import annotations

import functools
import ssl

import httpx2


@functools.cache
def tls_context() -> ssl.SSLContext:
    """What httpx builds for `verify=True` (the system's trusted CAs, or SSL_CERT_FILE / SSL_CERT_DIR when set),
    built once."""
    return httpx2.create_ssl_context()
