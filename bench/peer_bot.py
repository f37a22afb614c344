"""The peer of the comparison (issue #16): a minimal WhatsApp bot, the SDKs used the obvious way, nothing else.

Webhook, signature check (twilio's RequestValidator), one AsyncOpenAI Responses call raced against the deadline,
TwiML (twilio's MessagingResponse), a REST follow-up when the deadline passes. No journal, no dedupe store, no
tracing, no logs per message; three metrics. Served with the same uvicorn options as `wabot serve` (bot/server.py)
and configured by the same environment the benchmark gives wabot: `python -m bench.peer_bot --port P`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from openai import AsyncOpenAI
from prometheus_client import Counter, Histogram, make_asgi_app
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client
from twilio.twiml.messaging_response import MessagingResponse

MESSAGES = Counter("peer_messages", "Inbound messages by outcome", ["outcome"])
RESPONSE = Histogram("peer_response_seconds", "Webhook response time")
FOLLOWUPS = Counter("peer_followups", "REST follow-ups by outcome", ["outcome"])
HOLDING = "One moment, I'm working on your answer."


def twiml(text: str | None) -> Response:
    reply = MessagingResponse()
    if text:
        reply.message(text)
    return Response(str(reply), media_type="application/xml")


def create_app() -> FastAPI:
    env = os.environ
    deadline = float(env.get("WABOT_REPLY_TIMEOUT", "8"))
    public_url = env["WABOT_PUBLIC_URL"]
    validator = RequestValidator(env["TWILIO_AUTH_TOKEN"])
    openai = AsyncOpenAI(api_key=env["OPENAI_API_KEY"], base_url=env["OPENAI_BASE_URL"])
    twilio = Client(env["TWILIO_ACCOUNT_SID"], env["TWILIO_AUTH_TOKEN"])
    twilio.api.base_url = env["WABOT_TWILIO_API_URL"]
    model, sender = env.get("WABOT_MODEL", "gpt-4.1-mini"), env["TWILIO_WHATSAPP_FROM"]
    conversations: dict[str, str] = {}  # user -> last response id, in memory
    runs: set[asyncio.Task[str]] = set()
    followups: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # twilio's async HTTP client opens an aiohttp session, which wants the running loop.
        twilio.http_client = AsyncTwilioHttpClient()
        yield
        await openai.close()

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.mount("/metrics", make_asgi_app())

    async def answer(user: str, text: str) -> str:
        response = await openai.responses.create(
            model=model, input=text, previous_response_id=conversations.get(user), max_output_tokens=1024
        )
        conversations[user] = response.id
        return response.output_text

    async def follow_up(user: str, run: asyncio.Task[str]) -> None:
        try:
            text = await run
        except Exception:
            text = "Sorry, something went wrong. Please try again."
        try:
            await twilio.messages.create_async(to=user, from_=sender, body=text)
            FOLLOWUPS.labels(outcome="delivered").inc()
        except Exception:
            FOLLOWUPS.labels(outcome="failed").inc()

    @app.post("/whatsapp")
    async def inbound(request: Request) -> Response:
        started = time.monotonic()
        form = dict(await request.form())
        if not validator.validate(f"{public_url}/whatsapp", form, request.headers.get("X-Twilio-Signature", "")):
            MESSAGES.labels(outcome="rejected").inc()
            return Response("invalid signature\n", status_code=403)
        user, text = str(form.get("From", "")), str(form.get("Body", ""))
        run = asyncio.create_task(answer(user, text))
        runs.add(run)
        run.add_done_callback(runs.discard)
        done, _ = await asyncio.wait({run}, timeout=deadline - (time.monotonic() - started))
        if not done:
            MESSAGES.labels(outcome="timeout").inc()
            follow = asyncio.create_task(follow_up(user, run))
            followups.add(follow)
            follow.add_done_callback(followups.discard)
            reply = twiml(HOLDING)
        elif run.exception() is None:
            MESSAGES.labels(outcome="ok").inc()
            reply = twiml(run.result())
        else:
            MESSAGES.labels(outcome="error").inc()
            reply = twiml("Sorry, something went wrong. Please try again.")
        RESPONSE.observe(time.monotonic() - started)
        return reply

    @app.get("/readyz")
    async def readyz() -> dict[str, object]:
        return {"status": "ready", "runs_in_flight": len(runs) + len(followups)}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    options = {"host": "127.0.0.1", "port": args.port, "log_config": None, "access_log": False, "lifespan": "on"}
    uvicorn.Server(uvicorn.Config(create_app(), **options)).run()


if __name__ == "__main__":
    main()
