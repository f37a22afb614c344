"""Follow-ups: delivering an answer (or apology) through Twilio's REST API after the webhook sent a holding reply.

Progress is journaled part by part, so a restart resumes at the first part Twilio has not accepted.

A Twilio outage longer than one round of retries (WABOT_TWILIO_MAX_ATTEMPTS) does not end the follow-up: rounds
go on, further apart, until WABOT_FOLLOWUP_GIVE_UP seconds after the message arrived. A user who was promised an
answer gets it when Twilio is back; only a refusal (a 4xx such as 63016) or the give-up time ends it unsent.
"""

from __future__ import annotations

import asyncio
import time

from structlog.typing import FilteringBoundLogger

from bot.backoff import Backoff
from bot.outbound import DeliveryError, Sent, TwilioSender
from bot.store import OwedReply, Store, guarded
from telemetry import metrics
from telemetry.recent import RecentActivity

# Between rounds of retries (each round is WABOT_TWILIO_MAX_ATTEMPTS attempts with outbound's CALL_BACKOFF).
ROUND_BACKOFF = Backoff(base_s=2.0, cap_s=60.0)


class FollowupDelivery:
    """Sends the parts of a journaled reply in order and records the result."""

    def __init__(
        self,
        store: Store,
        sender: TwilioSender,
        log: FilteringBoundLogger,
        recent: RecentActivity | None = None,
        *,
        give_up_s: float = 900.0,
    ) -> None:
        self._store = store
        self._sender = sender
        self._log = log
        self._recent = recent or RecentActivity()
        self._give_up_s = give_up_s

    async def deliver(self, reply: OwedReply, *, resumed: bool = False) -> bool:
        """Send what is left of `reply`; True when every part was accepted. The journal entry is closed either way.

        `resumed`: an earlier process journaled this answer and may have crashed while Twilio took its next part,
        so that part is looked up at Twilio before it is sent.
        """
        parts = reply.answer_parts or []
        attempts = 0
        recovered = False
        first_unsent = reply.parts_sent
        try:
            for index in range(first_unsent, len(parts)):
                maybe_sent_since = reply.arrived_at if resumed and index == first_unsent else None
                sent = await self._send_until_given_up(reply, parts[index], maybe_sent_since)
                attempts += sent.attempts
                recovered = recovered or sent.recovered
                reply.parts_sent = index + 1
                if reply.kind == "answer":
                    metrics.REPLY_PARTS.inc()
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
            await guarded(self._store.drop(reply.sid), self._log, "drop", reply.sid)
            return False
        elapsed = time.time() - reply.arrived_at
        metrics.FOLLOWUPS.labels(outcome="delivered").inc()
        self._recent.record_followup("delivered")
        metrics.observe(metrics.FOLLOWUP_SECONDS, elapsed)
        # recovered: a call to Twilio failed without an answer, and the lookup found that Twilio had taken the part.
        self._log.info(
            "followup_sent",
            message_sid=reply.sid,
            elapsed_seconds=round(elapsed, 3),
            parts=len(parts),
            kind=reply.kind,
            attempts=attempts,
            **({"recovered": True} if recovered else {}),
        )
        await guarded(self._store.drop(reply.sid), self._log, "drop", reply.sid)
        return True

    async def _send_until_given_up(self, reply: OwedReply, part: str, maybe_sent_since: float | None) -> Sent:
        """One part, in rounds of retries until Twilio takes it, refuses it, or the give-up time has come.
        `attempts` (of the result or of the raised DeliveryError) counts every attempt for this part."""
        rounds_failed = attempts_so_far = 0
        while True:
            try:
                sent = await self._sender.send(reply.to, part, maybe_sent_since=maybe_sent_since)
            except DeliveryError as exc:
                rounds_failed += 1
                attempts_so_far += exc.attempts
                pause = ROUND_BACKOFF.delay(rounds_failed)
                if exc.error_type == "rejected" or time.time() + pause > reply.arrived_at + self._give_up_s:
                    exc.attempts = attempts_so_far
                    raise
                self._log.warning(
                    "followup_retry",
                    message_sid=reply.sid,
                    error_type=exc.error_type,
                    twilio_code=exc.code,
                    attempts=attempts_so_far,
                    next_round_in_s=pause,
                )
                await asyncio.sleep(pause)
                continue
            return Sent(sid=sent.sid, attempts=attempts_so_far + sent.attempts, recovered=sent.recovered)
