"""Where a webhook's deadline clock starts: the moment its request reaches the app, before any middleware."""

from __future__ import annotations

import time

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from telemetry.server_spans import drop_trace_context

ARRIVED = "wabot.arrived"


class WabotApp(FastAPI):
    """FastAPI stamping each request with the moment it reached the app, before any middleware runs.

    The reply deadline counts from that stamp. Under a burst, tracing middleware and routing of a thousand
    requests take a noticeable share of a second; counting from the handler would hide it from the deadline
    while Twilio's clock keeps running. It also drops a caller's trace context before the server span sees it.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[ARRIVED] = time.monotonic()
            drop_trace_context(scope)
        await super().__call__(scope, receive, send)
