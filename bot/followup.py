"""Follow-ups: delivering an answer (or apology) through Twilio's REST API after the webhook sent a holding reply.

Progress is journaled part by part, so a restart resumes at the first part Twilio has not accepted.
"""

from __future__ import annotations

import time
from typing import Any

from bot.outbound import DeliveryError, TwilioSender
from bot.store import PendingReply, Store, guarded
from telemetry import metrics
from telemetry.recent import RecentActivity


class FollowupDelivery:
    """Sends the parts of a journaled reply in order and records the result."""

    def __init__(self, store: Store, sender: TwilioSender, log: Any, recent: RecentActivity | None = None) -> None:
        self._store = store
        self._sender = sender
        self._log = log
        self._recent = recent or RecentActivity()

    async def deliver(self, reply: PendingReply) -> bool:
        """Send what is left of `reply`; True when every part was accepted. The journal entry is closed either way."""
        parts = reply.answer_parts or []
        attempts = 0
        try:
            for index in range(reply.parts_sent, len(parts)):
                sent = await self._sender.send(reply.to, parts[index])
                attempts += sent.attempts
                reply.parts_sent = index + 1
                await guarded(self._store.mark_sent(reply.sid, reply.parts_sent), self._log, "mark_sent", reply.sid)
        except DeliveryError as exc:
            metrics.FOLLOWUPS.labels(outcome="failed").inc()
            self._recent.record_followup("failed")
            self._log.error(
                "followup_failed",
                message_sid=reply.sid,
                error_type=exc.error_type,
                twilio_code=exc.code,
                attempts=attempts + exc.attempts,
                parts_sent=reply.parts_sent,
                parts=len(parts),
                kind=reply.kind,
            )
            await guarded(self._store.finish(reply.sid), self._log, "finish", reply.sid)
            return False
        elapsed = time.time() - reply.arrived_at
        metrics.FOLLOWUPS.labels(outcome="delivered").inc()
        self._recent.record_followup("delivered")
        metrics.observe(metrics.FOLLOWUP_SECONDS, elapsed)
        self._log.info(
            "followup_sent",
            message_sid=reply.sid,
            elapsed_seconds=round(elapsed, 3),
            parts=len(parts),
            kind=reply.kind,
            attempts=attempts,
        )
        await guarded(self._store.finish(reply.sid), self._log, "finish", reply.sid)
        return True
