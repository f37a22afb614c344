"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from bot.services import Services, get_services

router = APIRouter()
_READY_TIMEOUT_S = 2.0


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and its event loop answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(services: Services = Depends(get_services)) -> JSONResponse:
    """The store answers within 2 s; otherwise 503 so a load balancer sends traffic elsewhere."""
    try:
        async with asyncio.timeout(_READY_TIMEOUT_S):
            await services.store.ping()
    except Exception as exc:
        return JSONResponse({"status": "unavailable", "store": exc.__class__.__name__}, status_code=503)
    return JSONResponse(
        {
            "status": "ready",
            "runs_in_flight": services.runner.in_flight(),
            "typing_indicators_in_flight": services.typing.active(),
        }
    )
