"""The bot's outside world, one server per process: `python -m bench.stubs {simulator,sink,otlp} [--mode M]`.

Each binds a free port on 127.0.0.1, prints its base URL as the first line of stdout and serves until SIGTERM.
Separate processes keep the stubs' work off the bot's event loop and GIL, as the real OpenAI and Twilio would be.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from bench.config import ACCOUNT_SID, AUTH_TOKEN
from bot.demo.loopback import LoopbackServer
from bot.demo.openai_simulator import MODES, OpenAISimulator
from bot.demo.twilio_sink import TwilioSink


def otlp_receiver() -> FastAPI:
    """An OTLP/HTTP trace endpoint that counts what it gets, so "full telemetry" really exports its spans."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    stats = {"requests": 0, "spans": 0, "bytes": 0}
    empty = ExportTraceServiceResponse().SerializeToString()

    @app.post("/v1/traces")
    async def traces(request: Request) -> Response:
        body = await request.body()
        export = ExportTraceServiceRequest.FromString(body)
        stats["requests"] += 1
        stats["bytes"] += len(body)
        stats["spans"] += sum(len(s.spans) for r in export.resource_spans for s in r.scope_spans)
        return Response(empty, media_type="application/x-protobuf")

    @app.get("/_otlp/stats")
    async def get_stats() -> dict[str, int]:
        return dict(stats)

    return app


def sink_app(status_callbacks: bool) -> FastAPI:
    sink = TwilioSink(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, status_callbacks=status_callbacks)

    # The sink's own GET /_sink/messages copies every record; the benchmark needs only counts and arrival times.
    @sink.app.get("/_bench/arrivals")
    async def arrivals() -> dict[str, Any]:
        return {"at": [m["at"] for m in sink.messages()]}

    return sink.app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=["simulator", "sink", "otlp"])
    parser.add_argument("--mode", choices=MODES, default="instant", help="simulator latency profile")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--status-callbacks", action="store_true", help="sink posts status callbacks to the bot")
    args = parser.parse_args(argv)

    simulator: OpenAISimulator | None = None
    if args.kind == "simulator":
        simulator = OpenAISimulator(mode=args.mode, seed=args.seed, echo=True)  # the measured workload
        app: Any = simulator.app
    elif args.kind == "sink":
        app = sink_app(args.status_callbacks)
    else:
        app = otlp_receiver()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = LoopbackServer(app, name=args.kind)
    print(server.start(), flush=True)
    # Bounded: the parent always stops its stubs, but a stub it lost must not live forever.
    stop.wait(timeout=3600)
    if simulator is not None:
        simulator.shutdown()
    server.stop(timeout=5)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
