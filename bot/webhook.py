"""The Twilio-facing HTTP endpoints: inbound messages (`POST /whatsapp`) and status callbacks.

Every request is checked in the same order: size, form encoding, signature, fields. A request that fails a
check (or whose client leaves before its body ends) gets a clear 4xx, is counted, and never reaches the model or
the store; its `webhook_rejected` log line and trace are bounded under a flood (telemetry/flood.py).

A signed, well-formed message from a user over WABOT_USER_RATE_LIMIT messages a minute is not answered by the
model: the first one over the limit gets a polite notice, the rest of that minute an empty reply. A user whose model
tokens today reached WABOT_USER_DAILY_TOKENS is not answered by the model either: one notice a day, then empty
replies, each counted in `wabot_budget_refusals_total`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.requests import ClientDisconnect

from bot.arrival import ARRIVED
from bot.inbound import InboundMessage, MalformedRequest, form_dict, parse_form
from bot.replies import current_traceparent
from bot.services import Services, get_services
from bot.splitting import split_message
from bot.store import OwedReply
from bot.twiml import twiml
from telemetry import metrics

router = APIRouter()

_FORM_TYPE = "application/x-www-form-urlencoded"
_KNOWN_STATUSES = frozenset(
    [
        "accepted",
        "scheduled",
        "queued",
        "sending",
        "sent",
        "delivered",
        "read",
        "failed",
        "undelivered",
        "receiving",
        "received",
        "canceled",
        "partially_delivered",
    ]
)
_ERROR_CODE = re.compile(r"^[0-9]{1,6}$")
_RATE_WINDOW_S = 60


class _Rejected(Exception):
    def __init__(self, status_code: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.reason = reason
        self.detail = detail


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise _Rejected(413, "too_large", f"request body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _Rejected(413, "too_large", f"request body over {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # Nobody is left to answer; counted and logged like any refused request, not a server error.
        raise _Rejected(400, "disconnected", "the client closed the connection before the body ended") from None
    return b"".join(chunks)


async def _signed_form(request: Request, services: Services) -> list[tuple[str, str]]:
    """The request's form fields, once size, encoding and signature are known to be right."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != _FORM_TYPE:
        raise _Rejected(415, "malformed", f"expected {_FORM_TYPE}")
    raw = await _read_body(request, services.settings.max_body_bytes)
    try:
        pairs = parse_form(raw)
    except MalformedRequest as exc:
        raise _Rejected(400, "malformed", str(exc)) from exc
    if not services.signature.is_valid(request.url, pairs, request.headers):
        raise _Rejected(403, "signature", "missing or invalid X-Twilio-Signature")
    return pairs


def _reject(services: Services, request: Request, exc: _Rejected) -> Response:
    metrics.REJECTIONS.labels(reason=exc.reason).inc()
    # Anyone can send these: under a flood only the first few a second are logged and traced (telemetry/flood.py).
    suppressed = services.rejections.admit(exc.reason)
    if suppressed is not None:
        services.log.warning(
            "webhook_rejected",
            reason=exc.reason,
            status_code=exc.status_code,
            path=request.url.path,
            detail=exc.detail,
            **({"suppressed": suppressed} if suppressed else {}),
        )
    return PlainTextResponse(f"{exc.reason}: {exc.detail}\n", status_code=exc.status_code)


async def _accept(services: Services, reply: OwedReply, idempotency_token: str | None) -> bool:
    """Dedupe and journal; False for a message seen before."""
    try:
        return await services.store.accept(reply, idempotency_token)
    except Exception as exc:
        # Store down (locked, disk full, Redis restarting): answering without dedupe or journal beats not answering.
        services.log.error("store_error", op="accept", message_sid=reply.sid, error_type=exc.__class__.__name__)
        return True


async def _rate_limited(services: Services, request: Request, reply: OwedReply) -> Response | None:
    """The reply for a user over the per-minute limit (a notice once, then nothing), or None when within it."""
    limit = services.settings.user_rate_limit
    if limit <= 0:
        return None
    try:
        count = await services.store.count_message(reply.user_key, _RATE_WINDOW_S)
    except Exception as exc:
        # Without the counter the limit cannot be told; letting a message through beats dropping it.
        services.log.error("store_error", op="count_message", message_sid=reply.sid, error_type=exc.__class__.__name__)
        return None
    if count <= limit:
        return None
    notice = count == limit + 1
    fields = {"user_hash": reply.user_key, "count": count, "limit": limit, "notice": notice}
    _not_answered(services, request, "rate_limited", reply.sid, services.log.warning, **fields)
    return twiml(split_message(services.settings.rate_limit_message) if notice else [])


async def _over_budget(services: Services, reply: OwedReply) -> Response | None:
    """The reply for a user whose tokens today reached WABOT_USER_DAILY_TOKENS (a notice once a day, then nothing),
    or None when within it. One store read before the run; a store that fails it lets the message through. A run's
    tokens are counted when it ends, so a user can go over by the runs they have in flight at once."""
    limit = services.settings.user_daily_tokens
    if limit <= 0:
        return None
    try:
        used = await services.store.tokens_today(reply.user_key)
    except Exception as exc:
        # As for the rate limit: without the count the budget cannot be told; answering beats not answering.
        services.log.error("store_error", op="tokens_today", message_sid=reply.sid, error_type=exc.__class__.__name__)
        return None
    if used < limit:
        return None
    try:
        notice = await services.store.claim_budget_notice(reply.user_key)
    except Exception as exc:
        # Unknown whether today's notice went out: stay silent rather than risk sending it again and again.
        services.log.error(
            "store_error", op="claim_budget_notice", message_sid=reply.sid, error_type=exc.__class__.__name__
        )
        notice = False
    metrics.BUDGET_REFUSALS.inc()
    services.log.warning(
        "budget_refused", message_sid=reply.sid, user_hash=reply.user_key, tokens_today=used, limit=limit, notice=notice
    )
    return twiml(split_message(services.settings.budget_message) if notice else [])


def _not_answered(
    services: Services, request: Request, reason: str, message_sid: str, log_at: Callable[..., Any], **fields: Any
) -> None:
    """Count and log a signed message deliberately left to no model run. Its reply is a 200, so Twilio never
    retries it."""
    metrics.REJECTIONS.labels(reason=reason).inc()
    log_at("webhook_rejected", reason=reason, status_code=200, path=request.url.path, message_sid=message_sid, **fields)


@router.post("/whatsapp")
async def inbound_message(request: Request, services: Services = Depends(get_services)) -> Response:
    """Answer an inbound WhatsApp message inline within the deadline, or hold and follow up."""
    arrived = request.scope.get(ARRIVED, time.monotonic())
    try:
        form = form_dict(await _signed_form(request, services))
        message = InboundMessage.from_form(form)
    except MalformedRequest as exc:
        return _reject(services, request, _Rejected(400, "malformed", str(exc)))
    except _Rejected as exc:
        return _reject(services, request, exc)

    reply = OwedReply(
        sid=message.sid,
        to=message.sender,
        user_key=services.hasher(message.sender),
        prompt=message.prompt(),
        media=message.media,
        arrived_at=time.time(),
        traceparent=current_traceparent(),
    )
    # Counted before the journal is touched: a flood costs one counter increment per message, nothing more.
    limited = await _rate_limited(services, request, reply)
    if limited is not None:
        return limited
    refused = await _over_budget(services, reply)
    if refused is not None:
        return refused
    if not await _accept(services, reply, request.headers.get("i-twilio-idempotency-token")):
        _not_answered(services, request, "duplicate", message.sid, services.log.info)
        return twiml([])

    result = await services.responder.respond(message, reply, arrived)
    total = time.monotonic() - arrived
    metrics.observe(metrics.RESPONSE, total)
    services.recent.record_reply(result.outcome, total)
    services.log.info("total_time", message_sid=message.sid, total_time=round(total, 4), outcome=result.outcome)
    services.log.debug(
        "debug_response",
        message_sid=message.sid,
        reply_length=sum(len(part) for part in result.parts),
        tool_count=result.tool_count,
        total_time=round(total, 4),
    )
    return twiml(result.parts)


@router.post("/whatsapp/status")
async def message_status(request: Request, services: Services = Depends(get_services)) -> Response:
    """Record Twilio's delivery status for a message we sent (queued → sent → delivered, or failed)."""
    try:
        form = form_dict(await _signed_form(request, services))
    except _Rejected as exc:
        return _reject(services, request, exc)
    status = form.get("MessageStatus") or form.get("SmsStatus") or ""
    sid = form.get("MessageSid") or form.get("SmsSid") or ""
    if not status or not sid:
        return _reject(services, request, _Rejected(400, "malformed", "MessageSid and MessageStatus are required"))
    status_label = status if status in _KNOWN_STATUSES else "other"
    error_code = form.get("ErrorCode", "")
    code_label = error_code if _ERROR_CODE.fullmatch(error_code) else ("" if not error_code else "other")
    metrics.MESSAGE_STATUS.labels(status=status_label, error_code=code_label).inc()
    level: Callable[..., Any] = services.log.warning if status in ("failed", "undelivered") else services.log.info
    level("message_status", message_sid=sid, status=status_label, error_code=code_label)
    return twiml([])
