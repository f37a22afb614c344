"""Load generator for the load tests: N users each post one Twilio-signed message, all at once.

Runs in a process of its own (`python -m tests.loadgen ...`) so its event loop competes neither with the bot's
nor with the simulator and sink in the test process. aiohttp, not httpx: against a bare FastAPI handler on this
2-core machine httpx's async client needed about 7 s for 1,000 simultaneous requests, aiohttp well under one.
Every form is built and signed before the clock starts;
then all requests are released together and each one is timed from its send to its response. Prints one JSON
object: a result per user, in order.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from types import SimpleNamespace
from urllib.parse import urlencode
from xml.etree import ElementTree

import aiohttp
from twilio.request_validator import RequestValidator

from bot.demo.inbound_form import inbound_form


def signed_requests(args: argparse.Namespace) -> list[tuple[str, bytes, dict[str, str]]]:
    validator = RequestValidator(args.auth_token)
    requests = []
    for i in range(args.users):
        sender = f"+1555{args.first_number + i:07d}"
        form = inbound_form(args.body, sender=sender, to=args.to, account_sid=args.account_sid)
        signature = validator.compute_signature(f"{args.public_url}/whatsapp", form)
        headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature}
        requests.append((sender, urlencode(form).encode(), headers))
    return requests


def _timings() -> aiohttp.TraceConfig:
    """Per-request moments: when the connection was ready and when the request was on the wire."""
    trace = aiohttp.TraceConfig()

    async def connected(session: object, ctx: SimpleNamespace, params: object) -> None:
        ctx.trace_request_ctx["connected"] = time.monotonic()

    async def sent(session: object, ctx: SimpleNamespace, params: object) -> None:
        ctx.trace_request_ctx["sent"] = time.monotonic()

    trace.on_connection_create_end.append(connected)
    trace.on_request_chunk_sent.append(sent)
    return trace


async def run(args: argparse.Namespace) -> list[dict[str, object]]:
    requests = signed_requests(args)
    connector = aiohttp.TCPConnector(limit=args.users, force_close=True)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trace_configs=[_timings()]) as session:
        go = asyncio.Event()

        async def post(sender: str, body: bytes, headers: dict[str, str]) -> dict[str, object]:
            await go.wait()
            moments: dict[str, float] = {}
            started = time.monotonic()
            try:
                async with session.post(
                    f"{args.url}/whatsapp", data=body, headers=headers, trace_request_ctx=moments
                ) as response:
                    text = await response.text()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                return {"sender": sender, "status": None, "error": repr(exc), "elapsed": time.monotonic() - started}
            done = time.monotonic()
            messages = []
            if status == 200:
                messages = [m.text or "" for m in ElementTree.fromstring(text).iter("Message")]
            return {
                "sender": sender,
                "status": status,
                "messages": messages,
                # From the task's start: includes this one process opening a thousand connections in turn.
                "elapsed": done - started,
                # From the moment the whole request was on the wire: what a webhook caller's clock measures.
                "since_sent": done - moments.get("sent", started),
                "connect": moments.get("connected", started) - started,
            }

        tasks = [asyncio.create_task(post(*request)) for request in requests]
        await asyncio.sleep(0)  # let every task reach the start line
        go.set()
        return await asyncio.gather(*tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--public-url", required=True)
    parser.add_argument("--auth-token", required=True)
    parser.add_argument("--account-sid", required=True)
    parser.add_argument("--to", required=True)
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--first-number", type=int, default=1_000_000)
    parser.add_argument("--body", required=True)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    started = time.monotonic()
    results = asyncio.run(run(args))
    json.dump({"results": results, "wall_s": time.monotonic() - started}, sys.stdout)


if __name__ == "__main__":
    main()
