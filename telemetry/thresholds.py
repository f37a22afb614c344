"""Every threshold, SLO target, window and the Prometheus job of wabot, written once.

The alert rules (alerts/generate.py), the Grafana dashboard (dashboards/generate.py), the status view
(telemetry/recent.py, bot/status.py) and the log analysis (telemetry/analyze.py) all read `THRESHOLDS`; none of
them writes one of these numbers or the job name itself. To move a line (say the 12 s one), change its default
here, then regenerate the checked-in files:

    python alerts/generate.py && python dashboards/generate.py

Each generator also takes a `Thresholds` as a parameter (like kubernetes-mixin's `$._config`), which is how the
tests show every place follows a change. The runbooks (alerts/runbooks/*.md) quote these numbers in prose; a
test fails, naming the page, when one no longer matches.

Names follow the numbers where the name is generated: the recording rule `wabot:response_over_12s:ratio_rate5m`,
the SLO `reply_15s`, the status JSON's `over_12s`, the panel "Replies over 12 s / 15 s" all carry the current
values. `wabot analyze`'s report fields `total_time_over_12s`/`_15s` keep their names (they are Python fields).

Standard library only: telemetry/analyze.py, which reads it, must run without the bot's dependencies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final


@dataclass(frozen=True)
class TotalTime:
    """Lines on a webhook reply's total time (request arrival to TwiML sent), in whole seconds.

    Both must be edges of the seconds histograms' buckets (telemetry/metrics.py SECONDS_BUCKETS), so "slower
    than the line" is an exact count from one bucket, not an estimate; alerts/generate.py refuses other values.
    """

    # Twilio waits at most 15 s in total (connect included) for the webhook's answer, then gives up: the user gets
    # nothing, not even the holding reply.
    twilio_limit_s: int = 15
    # The operator's target: 3 s of margin before Twilio's limit. `wabot analyze` recommends the longest
    # deadline that keeps total time within it; WabotResponseTimeHigh warns when replies cross it.
    slow_s: int = 12


@dataclass(frozen=True)
class AlertLines:
    """Thresholds and the rate window of the operational alerts (everything but the SLO burn-rate alerts)."""

    # Window of the operational ratios and increases (`wabot:*:ratio_rate5m`, `...:increase5m`). The status
    # view keeps the same window in memory, so its timeout ratio is the one the alert sees.
    window: str = "5m"
    # Traffic gate of the ratio alerts: below this many messages in `window` a ratio is noise (1 of 3 is 33 %).
    min_messages: int = 10
    # WabotAITimeoutRatioHigh: share of messages answered by holding reply + follow-up. A few slow answers are
    # what the deadline is for; one in five means the model or a tool is slow, not the odd hard question.
    timeout_ratio: float = 0.20
    # WabotResponseTimeHigh: share of replies over `TotalTime.slow_s`. With the deadline below the slow line
    # almost none should cross it; 1 % is a trend, not a single hiccup.
    slow_reply_ratio: float = 0.01
    # WabotRunsAtCapacity: share of messages that found every model slot taken (they wait, and are answered
    # later as follow-ups). 5 % sustained means the cap or the capacity is too small.
    busy_ratio: float = 0.05
    # WabotSignatureRejections: more than this many bad signatures in `window` is a spike, not a stray scanner.
    signature_rejections: int = 5


@dataclass(frozen=True)
class MediaLines:
    """Lines of the attachment and typing-indicator alerts (#14); their window is `AlertLines.window`, so the status
    view's shares are the ones the alerts see."""

    # What the failure share is made of. A download that failed (Twilio's media API: auth, 404, timeout) or a
    # transcription that failed (OpenAI) is the bot's or a vendor's fault and an operator can act on it; an
    # attachment over WABOT_MAX_MEDIA_BYTES or of a type the bot cannot read is the user's choice, and its reply says
    # so. Those two are left out of both sides of the share, so a user sending videos neither raises nor dilutes it.
    failure_outcomes: tuple[str, ...] = ("fetch_error", "transcribe_error")
    read_outcomes: tuple[str, ...] = ("ok", "fetch_error", "transcribe_error")
    # WabotMediaFailing: share of the attachments the bot should have read that failed. Those users got a reply that
    # says what went wrong, not the answer; more than one in five is an outage of Twilio's media or of transcription,
    # not the odd expired link.
    failure_ratio: float = 0.20
    # Traffic gate: attachments are rarer than messages; below this many read attempts in the window one failure
    # (1 of 2 voice notes in a quiet hour) is noise.
    min_attachments: int = 5
    # WabotTypingIndicatorsFailing: share of typing indicators Twilio refused or that timed out. The reply still
    # arrives; the user only misses the sign of life, so a higher line than for media.
    typing_failure_ratio: float = 0.25
    # Traffic gate of the typing alert (indicators, refreshes included, in the window).
    min_typing_indicators: int = 10
    # The promise of #14: "typing…" within a second of arrival. The dashboard and /status draw it under the p95 of
    # arrival -> indicator accepted; no alert: a slow indicator is a symptom of a slow Twilio, which others catch.
    typing_line_s: int = 1


# `for:` of each operational alert: how long the condition must hold before it fires. Short where users are
# already hurt (1m: dropped replies, errors, failed deliveries), longer where a blip is normal.
FOR: Final = MappingProxyType(
    {
        "WabotDown": "2m",  # one missed scrape or a restart is not an outage
        "WabotAITimeoutRatioHigh": "5m",  # one window's worth: a burst of hard questions passes
        "WabotResponseTimeHigh": "2m",
        "WabotResponseOverTwilioLimit": "1m",  # those users already got nothing
        "WabotAIErrors": "1m",  # those users already got an apology
        "WabotFollowupsFailing": "1m",  # those users got a holding reply and then nothing
        "WabotMessageDeliveryFailing": "1m",
        "WabotSignatureRejections": "2m",
        "WabotRunsAtCapacity": "10m",  # the busy reply is designed for bursts; only a lasting shortage matters
        "WabotStoreErrors": "2m",  # one Redis failover or SQLite lock timeout is not an incident
        "WabotMediaFailing": "5m",  # those users got a reply saying what failed; a burst of Twilio 5xx passes
        "WabotTypingIndicatorsFailing": "10m",  # cosmetic: the answer still arrives
        "WabotBudgetRefusalsHigh": "5m",  # a handful of users over budget at once passes; lasting refusals do not
        "WabotAnswersShortenedOften": "15m",  # a few long questions pass; a lasting share is a setting to change
    }
)


@dataclass(frozen=True)
class BurnRate:
    """One row of the multiwindow, multi-burn-rate table (Google SRE workbook, chapter 5).

    Fires when the error ratio over `long` and over `short` both exceed `factor` x the error budget (1 - target),
    for `for_`. The short window makes the alert stop soon after the burn stops.
    """

    severity: str
    for_: str
    long: str
    short: str
    factor: float


@dataclass(frozen=True)
class Objectives:
    """The two SLOs (30-day budget) and their burn-rate alerts."""

    # Replies (inline or holding) sent within Twilio's limit (`TotalTime.twilio_limit_s`): one in a thousand may
    # be lost to a slow host or a GC pause; more is a broken deadline race.
    reply_target: float = 0.999
    # Messages whose real answer reached the user (inline or follow-up): the model API's own errors and Twilio
    # outages outlasting the retries are outside our control, hence a looser target than the reply SLO.
    delivered_target: float = 0.995
    # Page at 2 % (1h) or 5 % (6h) of the 30-day budget spent, ticket at 10 % (1d, 3d): the workbook's table.
    burn_rates: tuple[BurnRate, ...] = (
        BurnRate("critical", "2m", "1h", "5m", 14.4),
        BurnRate("critical", "15m", "6h", "30m", 6),
        BurnRate("warning", "1h", "1d", "2h", 3),
        BurnRate("warning", "3h", "3d", "6h", 1),
    )
    # Burn-rate alerts need at least this many messages in their long window: 1 error in 3 messages is no burn.
    min_messages: int = 10
    # The budget's period, which the factors above are computed for (14.4 x 1h = 2 % of 30 days).
    period: str = "30d"

    @property
    def windows(self) -> tuple[str, ...]:
        """Every window an error ratio is recorded for (long and short of every row), shortest first."""
        return tuple(sorted({w for b in self.burn_rates for w in (b.long, b.short)}, key=duration_seconds))

    @property
    def long_windows(self) -> tuple[str, ...]:
        """The long window of every row, shortest first (the dashboard's burn-rate series)."""
        return tuple(sorted({b.long for b in self.burn_rates}, key=duration_seconds))


@dataclass(frozen=True)
class SpendLines:
    """The spend alerts: against the operator's daily budget (WABOT_DAILY_BUDGET_USD, the gauge
    `wabot_daily_budget_usd`; silent while it is 0), the per-user budget's refusals, and answers cut at the parts cap.
    """

    # WabotSpendBurnRateHigh, burn-rate style: the spend rate over `long` and over `short`, taken over a whole day,
    # both above `factor` x the daily budget. 3x over 1 hour (the budget gone in 8 h) pages; 1x over 6 hours
    # (on pace to spend more than the budget today) is a ticket.
    burn_rates: tuple[BurnRate, ...] = (
        BurnRate("critical", "2m", "1h", "5m", 3),
        BurnRate("warning", "15m", "6h", "30m", 1),
    )
    # The budget's period, which the factors are relative to.
    period: str = "1d"
    # Window of the dashboard's "Spend per hour" and "Cost per conversation" (a conversation lasts minutes).
    dashboard_window: str = "1h"
    # WabotBudgetRefusalsHigh: messages refused for the per-user daily budget in `AlertLines.window`. A user over
    # budget sends a few more; this many is someone running the bot up on purpose (or a budget set too low).
    budget_refusals: int = 10
    # WabotAnswersShortenedOften: share of messages whose answer was cut at WABOT_MAX_REPLY_PARTS (traffic gate
    # `AlertLines.min_messages`). An odd long answer is fine; one in twenty means the instructions or the cap are off.
    shortened_ratio: float = 0.05

    @property
    def windows(self) -> tuple[str, ...]:
        """Every window a spend rate is recorded for, shortest first."""
        return tuple(sorted({w for b in self.burn_rates for w in (b.long, b.short)}, key=duration_seconds))


@dataclass(frozen=True)
class DashboardLines:
    """Colour steps of dashboard panels that no alert shares (the others come from the groups above)."""

    # "Follow-ups pending" turns orange: that many users waiting for their answer is more than a slow minute.
    followups_pending: int = 10
    # "SLO error budget" turns orange below this share left, red below 0 (spent).
    budget_left: float = 0.25


@dataclass(frozen=True)
class Thresholds:
    """Everything above in one value: what the generators and views take (`THRESHOLDS` unless a test says)."""

    # The Prometheus scrape job of the bot (deploy/prometheus.yml). On Kubernetes it is usually the Service's
    # name: change it here and regenerate, and every rule selects and labels that job.
    job: str = "wabot"
    total_time: TotalTime = field(default_factory=TotalTime)
    alerts: AlertLines = field(default_factory=AlertLines)
    media: MediaLines = field(default_factory=MediaLines)
    # `for:` of each operational alert by name (the burn-rate rows carry their own).
    for_: MappingProxyType[str, str] = field(default_factory=lambda: FOR)
    slo: Objectives = field(default_factory=Objectives)
    spend: SpendLines = field(default_factory=SpendLines)
    dashboard: DashboardLines = field(default_factory=DashboardLines)

    @property
    def job_selector(self) -> str:
        """The matcher every rule that reads raw series puts in its selector."""
        return f'job="{self.job}"'

    @property
    def status_window_s(self) -> float:
        """The status view's in-memory window: the alerts' ratio window, so both show the same ratio."""
        return duration_seconds(self.alerts.window)


THRESHOLDS: Final = Thresholds()

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")


def duration_seconds(duration: str) -> float:
    """Seconds of a Prometheus duration such as "5m" or "1h30m"; ValueError for anything else."""
    parts = _DURATION.findall(duration)
    if not duration or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return float(sum(int(n) * _UNITS[u] for n, u in parts))


_WORDS = {"ms": "millisecond", "s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week", "y": "year"}


def duration_words(duration: str) -> str:
    """A one-unit Prometheus duration in words: "5m" -> "5 minutes", "1h" -> "1 hour"."""
    duration_seconds(duration)
    ((number, unit),) = _DURATION.findall(duration)
    return f"{number} {_WORDS[unit]}{'' if number == '1' else 's'}"


def seconds_name(seconds: float) -> str:
    """How a line appears in names: 12 -> "12s" (recording rules, SLO and JSON keys)."""
    return f"{seconds:g}s"
