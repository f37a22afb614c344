"""The floor of the fast path: FastAPI parsing the webhook form and answering static TwiML, nothing else.

No signature check, store, model call or telemetry: whatever the bot costs above this is the bot's own work.
Served with the same uvicorn options as `wabot serve` (bot/server.py): `python -m bench.bare_app --port P`.
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response><Message>[turn 1] hello</Message></Response>'


def create_app() -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/whatsapp")
    async def inbound(request: Request) -> Response:
        form = await request.form()
        if not form.get("MessageSid"):
            return Response("missing MessageSid\n", status_code=400)
        return Response(_TWIML, media_type="application/xml")

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    options = {"host": "127.0.0.1", "port": args.port, "log_config": None, "access_log": False, "lifespan": "on"}
    uvicorn.Server(uvicorn.Config(create_app(), **options)).run()


if __name__ == "__main__":
    main()
