"""Offline analysis of wabot's JSON logs: how fast it answers, how often it times out, which deadline to set.

Reads the structlog JSON lines of the bot (the current bot and the old seed bot, whose lines lack level,
timestamp, trace ids, ``phase`` and ``outcome``) and condenses them into a `Report`: message and timeout
counts, total-time and AI-time percentiles, follow-up delivery, webhook rejections, Twilio message statuses
and a recommended reply deadline. `run` is the body of ``wabot analyze FILE... [--json]``. Standard library
only.

Lines
    S is the slow line (12 s) and L Twilio's limit (15 s), both from telemetry/thresholds.py, which the alerts
    and the dashboard read too; `Analyzer` and `recommend_deadline` take other values for tests.

Input tolerance
    A line is accepted when a JSON object starts somewhere in it (so docker/k8s prefixes such as
    ``2025-01-10T10:00:00Z stdout F {...}`` are fine) and that object has a string ``event``. Blank lines
    are skipped. Every other line is a bad line: counted, the first five located (source and 1-based line
    number), never fatal. Unknown events are only counted (``events``). Numbers may be JSON numbers or
    strings; a required number (``elapsed_seconds`` of ``ai_processing_time``/``ai_timeout``, ``total_time``
    of ``total_time``) that is missing, not finite or negative is counted in ``bad_values`` and left out of
    the statistics, while the event itself still counts. A line without ``phase`` (the seed) is an inline
    one: the seed had no follow-ups.

Counting
    ``messages`` is the number of ``total_time`` events (one per processed inbound message). Logs without any
    (truncated, or filtered by event) fall back to inline ``ai_processing_time`` + ``ai_timeout`` + inline
    ``ai_error_in_timeout``: each processed message ends its deadline race in exactly one of those.
    ``timeout_ratio`` = timeouts / messages. ``total_time_over_12s``/``_15s`` count total times strictly
    above S / L (the field names carry the default lines).

Percentiles
    Linear interpolation between closest ranks, like numpy's default (``method="linear"``): for sorted
    values x[0], ..., x[n-1] the p-th percentile sits at rank r = p/100 * (n-1) and is
    x[floor(r)] + (r - floor(r)) * (x[ceil(r)] - x[floor(r)]). None when there are no values.

Attachments and typing indicators (`MediaSummary`, the report's ``media``)
    ``media`` events (one per attachment: kind, outcome, fetch_s, transcribe_s, error_type) are counted by outcome
    and by kind; the failure share is WabotMediaFailing's (fetch and transcription errors among ok + those two,
    as telemetry/thresholds.py `MediaLines` defines it). ``typing_indicator`` events are counted by outcome,
    failures by error_type and error_code, and the arrival -> accepted ``seconds`` of non-refresh ones are timed.
    Their numbers are optional: a missing or invalid one is left out of the times, never a bad value.

Deadline recommendation (`recommend_deadline`)
    Question: which reply deadline D keeps total time (arrival -> TwiML sent) within S while cutting off
    the fewest answers?

    * Overhead o. Per message whose AI outcome and ``total_time`` are both in the log, overhead =
      total_time minus the AI time: the run's ``elapsed_seconds`` for an inline answer, or the
      ``elapsed_seconds`` at the deadline for a timeout (the holding-reply path has overhead too). Events are
      paired by ``message_sid`` (``trace_id`` when there is none); id-less seed lines pair an AI event with
      the next id-less ``total_time`` when no other id-less AI event came between. Error outcomes and
      negative differences are left out. o = p99 of the samples, or 0.1 s when there are none (then
      ``overhead_measured`` is false).
    * With deadline D the slowest webhook answer takes about D + o (an answer just before D, or the holding
      reply at D), so D is admissible when D + o <= S (the operator's target) and D + o < L (Twilio's
      limit).
    * Candidates are D = 1.0, 1.5, 2.0, ... s (0.5 s grid). The cut-off share never grows with D, so the
      largest admissible candidate cuts off the fewest answers: D = floor((S - o) / 0.5) * 0.5, if that is
      at least 1 s.
    * Cut-off share at D = cut-off runs / runs considered. A run is cut off when its run time exceeds D (one
      finishing exactly at D is answered inline). Known run times: every valid ``ai_processing_time``,
      inline and followup (follow-up runs show how long the slow answers really take). Unknown run times: an
      ``ai_timeout`` with no follow-up outcome in the log (every seed timeout, or a log that ends too early):
      the run took more than its ``timeout_seconds``, but how much more is unknown. It is counted as cut off
      at every D (certain for D <= its timeout_seconds, a conservative assumption above), so the share is an
      upper bound when there are such runs. A timeout whose follow-up run failed (``ai_error_in_timeout``
      with phase followup) had no answer to cut off and is left out; so are errors in general.
    * No known run times and no timeouts: no recommendation. o > S - 1 s: no admissible candidate, no
      recommendation. Either way ``reason`` says why.
    The current deadline is the last ``timeout_seconds`` seen; its cut-off share is given for comparison.
"""

from __future__ import annotations

import gzip
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from telemetry.thresholds import THRESHOLDS, Thresholds

DEADLINE_GRID_S = 0.5
MOST_EXPENSIVE_HOURS = 5
MIN_DEADLINE_S = 1.0
DEFAULT_OVERHEAD_S = 0.1
MAX_BAD_LINE_REFS = 5
# A garbage line full of braces must not cost a JSON parse per brace.
_MAX_DECODE_ATTEMPTS = 8
_DECODER = json.JSONDecoder()
_STDIN = "-"


@dataclass(frozen=True)
class LineRef:
    """Where a line came from: the file (``<stdin>``, ``<input>``) and its 1-based line number in it."""

    source: str
    line: int

    def __str__(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass
class Recommendation:
    """The recommended reply deadline and what it would cost; see the module docstring for the rule."""

    deadline_seconds: float | None
    reason: str
    cut_off_share: float | None = None
    cut_off_runs: int = 0
    runs_considered: int = 0
    runs_unknown_length: int = 0
    overhead_p99_seconds: float | None = None
    overhead_samples: int = 0
    overhead_measured: bool = False
    current_deadline_seconds: float | None = None
    current_cut_off_share: float | None = None
    current_cut_off_runs: int | None = None


@dataclass
class MediaSummary:
    """The `media` (one per attachment) and `typing_indicator` events (#14). Times are seconds; None: no data.

    ``failure_ratio`` is WabotMediaFailing's share: fetch and transcription errors among the attachments the bot
    should have read (too large and unsupported ones are the senders' and left out). Download and transcription
    times include failed attempts, as the histograms do. ``typing_first_*`` is arrival -> accepted of the first
    indicator of each message (refreshes carry ``refresh: true`` and are not timed).
    """

    attachments: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    failure_ratio: float | None = None
    errors_by_type: dict[str, int] = field(default_factory=dict)
    fetch_p50: float | None = None
    fetch_p95: float | None = None
    fetch_max: float | None = None
    transcriptions: int = 0
    transcription_p50: float | None = None
    transcription_p95: float | None = None
    transcription_max: float | None = None
    typing_indicators: dict[str, int] = field(default_factory=dict)
    typing_refreshes: int = 0
    typing_errors: dict[str, int] = field(default_factory=dict)
    typing_first_p50: float | None = None
    typing_first_p95: float | None = None
    typing_first_max: float | None = None


@dataclass
class Report:
    """Everything `analyze` found in the logs. Times are seconds; ratios are 0..1; None means no data."""

    lines_read: int = 0
    bad_lines: int = 0
    first_bad_lines: list[LineRef] = field(default_factory=list)
    bad_values: int = 0
    period_start: str | None = None
    period_end: str | None = None
    events: dict[str, int] = field(default_factory=dict)
    messages: int = 0
    messages_counted_from: str = "none"
    outcomes: dict[str, int] = field(default_factory=dict)
    timeouts: int = 0
    timeout_ratio: float | None = None
    ai_errors: int = 0
    ai_errors_by_type: dict[str, int] = field(default_factory=dict)
    ai_errors_by_phase: dict[str, int] = field(default_factory=dict)
    total_time_p50: float | None = None
    total_time_p95: float | None = None
    total_time_p99: float | None = None
    total_time_max: float | None = None
    total_time_over_12s: int = 0
    total_time_over_15s: int = 0
    ai_runs: int = 0
    ai_runs_inline: int = 0
    ai_runs_followup: int = 0
    ai_processing_p50: float | None = None
    ai_processing_p95: float | None = None
    ai_processing_p99: float | None = None
    ai_processing_max: float | None = None
    followups_sent: int = 0
    followups_failed: int = 0
    followup_delivery_rate: float | None = None
    followups_by_kind: dict[str, int] = field(default_factory=dict)
    rejections: dict[str, int] = field(default_factory=dict)
    message_statuses: dict[tuple[str, str | None], int] = field(default_factory=dict)
    recommendation: Recommendation = field(
        default_factory=lambda: Recommendation(None, "No AI run times or timeouts in the logs.")
    )
    media: MediaSummary = field(default_factory=MediaSummary)
    # What the model calls cost (`ai_usage` events) and the budget refusals (`budget_refused`): SpendTally.report.
    spend: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: floats rounded to 6 decimals, statuses as a list of {status, error_code, count}."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "first_bad_lines":
                value = [{"source": ref.source, "line": ref.line} for ref in value]
            elif name == "message_statuses":
                value = [
                    {"status": status, "error_code": code, "count": count}
                    for (status, code), count in sorted(value.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))
                ]
            elif name in ("recommendation", "media"):
                value = {key: getattr(value, key) for key in value.__dataclass_fields__}
            out[name] = _rounded(value)
        return out


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100) by linear interpolation (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    rank = p / 100 * (len(xs) - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def parse_line(line: str) -> dict[str, Any] | None:
    """The log event in a line (a JSON object with a string ``event``, anywhere in the line), or None."""
    start = line.find("{")
    attempts = 0
    while start != -1 and attempts < _MAX_DECODE_ATTEMPTS:
        attempts += 1
        try:
            obj, end = _DECODER.raw_decode(line, start)
        except (ValueError, RecursionError):
            start = line.find("{", start + 1)
            continue
        if isinstance(obj, dict) and isinstance(obj.get("event"), str):
            return obj
        # A prefix that happens to be JSON (e.g. `{"pod": "x"} {...}`): look after it, not inside it.
        start = line.find("{", end)
    return None


def recommend_deadline(
    known_runs: Sequence[float],
    unknown_timeouts: Sequence[float | None],
    overhead_samples: Sequence[float],
    current_deadline: float | None = None,
    *,
    target_total: float = THRESHOLDS.total_time.slow_s,
    twilio_limit: float = THRESHOLDS.total_time.twilio_limit_s,
) -> Recommendation:
    """Apply the deadline rule of the module docstring.

    ``known_runs``: AI run times that produced an answer (all phases). ``unknown_timeouts``: the
    ``timeout_seconds`` (None if unknown) of each timed-out run whose length is unknown. ``overhead_samples``:
    total_time minus AI time per message.
    """
    p99 = percentile(overhead_samples, 99)
    measured = p99 is not None
    overhead = p99 if p99 is not None else DEFAULT_OVERHEAD_S
    considered = len(known_runs) + len(unknown_timeouts)
    base = Recommendation(
        deadline_seconds=None,
        reason="",
        runs_considered=considered,
        runs_unknown_length=len(unknown_timeouts),
        overhead_p99_seconds=overhead,
        overhead_samples=len(overhead_samples),
        overhead_measured=measured,
        current_deadline_seconds=current_deadline,
    )

    def cut_off(deadline: float) -> int:
        # Unknown-length runs took longer than their timeout; counting them at every D gives an upper bound.
        return sum(1 for run in known_runs if run > deadline) + len(unknown_timeouts)

    if current_deadline is not None and considered:
        base.current_cut_off_runs = cut_off(current_deadline)
        base.current_cut_off_share = base.current_cut_off_runs / considered
    if not considered:
        base.reason = "No AI run times or timeouts in the logs, so there is nothing to base a deadline on."
        return base

    # Integer steps on the grid, with a little slack so 12 - 0.5 = 11.5 is not lost to float rounding.
    eps = 1e-9
    chosen: float | None = None
    step = 0
    while True:
        deadline = MIN_DEADLINE_S + step * DEADLINE_GRID_S
        if deadline + overhead > target_total + eps or deadline + overhead >= twilio_limit:
            break
        chosen = deadline
        step += 1
    overhead_text = f"{overhead:.2f} s p99 overhead" + ("" if measured else " (assumed, none measured)")
    if chosen is None:
        base.reason = (
            f"The {overhead_text} leaves no deadline of at least {MIN_DEADLINE_S:g} s that keeps total time "
            f"within {target_total:g} s."
        )
        return base

    runs = cut_off(chosen)
    base.deadline_seconds = chosen
    base.cut_off_runs = runs
    base.cut_off_share = runs / considered
    unknown = len(unknown_timeouts)
    unknown_text = (
        f", counting {unknown} timed-out run{'s' if unknown != 1 else ''} of unknown length as cut off"
        if unknown
        else ""
    )
    current_text = ""
    if current_deadline is not None and base.current_cut_off_share is not None:
        current_text = (
            f", against {base.current_cut_off_runs} ({base.current_cut_off_share:.1%}) at the current "
            f"{current_deadline:g} s deadline"
        )
        if current_deadline + overhead > target_total:
            current_text += f", which lets total time reach {current_deadline + overhead:.1f} s"
    base.reason = (
        f"{chosen:g} s is the longest deadline on the {DEADLINE_GRID_S:g} s grid that with the "
        f"{overhead_text} keeps total time within {target_total:g} s; it would cut off {runs} of "
        f"{considered} AI runs ({base.cut_off_share:.1%}){unknown_text}{current_text}."
    )
    return base


@dataclass
class _Message:
    """What the log says about one inbound message, keyed by message_sid (or trace_id)."""

    inline_ai: float | None = None
    timed_out: bool = False
    timeout_elapsed: float | None = None
    timeout_seconds: float | None = None
    followup_answer: bool = False
    followup_error: bool = False
    total: float | None = None
    outcome: str | None = None


class _MediaTally:
    """Counts the `media` and `typing_indicator` events; `summary` condenses them."""

    EVENTS = ("media", "typing_indicator")

    def __init__(self, thresholds: Thresholds) -> None:
        self._lines = thresholds.media
        self._by_kind: dict[str, Counter[str]] = {}
        self._outcomes: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._fetch: list[float] = []
        self._transcribe: list[float] = []
        self._typing: Counter[str] = Counter()
        self._refreshes = 0
        self._typing_errors: Counter[str] = Counter()
        self._first: list[float] = []

    def event(self, name: str, obj: dict[str, Any]) -> None:
        outcome = _text(obj.get("outcome")) or "unknown"
        if name == "media":
            self._outcomes[outcome] += 1
            self._by_kind.setdefault(_text(obj.get("kind")) or "unknown", Counter())[outcome] += 1
            if error := _text(obj.get("error_type")):
                self._errors[error] += 1
            # Optional fields: an attachment refused before its download has no fetch_s, a photo no transcribe_s.
            if (fetch := _duration(obj.get("fetch_s"))) is not None:
                self._fetch.append(fetch)
            if (transcribe := _duration(obj.get("transcribe_s"))) is not None:
                self._transcribe.append(transcribe)
            return
        self._typing[outcome] += 1
        refresh = obj.get("refresh") is True
        self._refreshes += refresh
        if outcome == "failed":
            error, code = _text(obj.get("error_type")) or "unknown", _code(obj.get("error_code"))
            self._typing_errors[error if code is None else f"{error} ({code})"] += 1
        elif not refresh and (seconds := _duration(obj.get("seconds"))) is not None:
            self._first.append(seconds)

    def summary(self) -> MediaSummary:
        read = sum(self._outcomes[o] for o in self._lines.read_outcomes)
        failed = sum(self._outcomes[o] for o in self._lines.failure_outcomes)
        return MediaSummary(
            attachments=sum(self._outcomes.values()),
            outcomes=dict(sorted(self._outcomes.items())),
            by_kind={kind: dict(sorted(c.items())) for kind, c in sorted(self._by_kind.items())},
            failure_ratio=failed / read if read else None,
            errors_by_type=dict(sorted(self._errors.items())),
            fetch_p50=percentile(self._fetch, 50),
            fetch_p95=percentile(self._fetch, 95),
            fetch_max=max(self._fetch, default=None),
            transcriptions=len(self._transcribe),
            transcription_p50=percentile(self._transcribe, 50),
            transcription_p95=percentile(self._transcribe, 95),
            transcription_max=max(self._transcribe, default=None),
            typing_indicators=dict(sorted(self._typing.items())),
            typing_refreshes=self._refreshes,
            typing_errors=dict(sorted(self._typing_errors.items())),
            typing_first_p50=percentile(self._first, 50),
            typing_first_p95=percentile(self._first, 95),
            typing_first_max=max(self._first, default=None),
        )


class Analyzer:
    """Accumulates log lines from one or more sources; `report` condenses them. `analyze` wraps it."""

    def __init__(self, thresholds: Thresholds = THRESHOLDS) -> None:
        self._total_time = thresholds.total_time
        self._lines = 0
        self._bad = 0
        self._bad_refs: list[LineRef] = []
        self._bad_values = 0
        self._first_ts: datetime | None = None
        self._last_ts: datetime | None = None
        self._events: Counter[str] = Counter()
        self._outcomes: Counter[str] = Counter()
        self._totals: list[float] = []
        self._timeouts = 0
        self._errors_by_type: Counter[str] = Counter()
        self._errors_by_phase: Counter[str] = Counter()
        self._runs: list[float] = []
        self._runs_by_phase: Counter[str] = Counter()
        self._followups_by_kind: Counter[str] = Counter()
        self._followups_failed = 0
        self._rejections: Counter[str] = Counter()
        self._statuses: Counter[tuple[str, str | None]] = Counter()
        self._current_deadline: float | None = None
        self._messages: dict[str, _Message] = {}
        # Id-less (seed) lines: the AI time of the last AI event, waiting for its total_time.
        self._pending_ai: float | None = None
        self._idless_overheads: list[float] = []
        self._idless_unknown: list[float | None] = []
        self._media = _MediaTally(thresholds)
        self._spend = SpendTally()

    def feed(self, lines: Iterable[str], source: str = "<input>") -> None:
        """Read lines (with or without trailing newlines); numbering restarts at 1 for each source."""
        for number, raw in enumerate(lines, 1):
            self._lines += 1
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            obj = parse_line(line)
            if obj is None:
                self._bad += 1
                if len(self._bad_refs) < MAX_BAD_LINE_REFS:
                    self._bad_refs.append(LineRef(source, number))
                continue
            self._event(obj)

    def _event(self, obj: dict[str, Any]) -> None:
        name: str = obj["event"]
        self._events[name] += 1
        self._timestamp(obj.get("timestamp"))
        self._spend.event(name, obj)
        key = _text(obj.get("message_sid")) or _text(obj.get("trace_id"))
        if name in _MediaTally.EVENTS:
            self._media.event(name, obj)
            return
        msg = self._messages.setdefault(key, _Message()) if key else None
        if name == "ai_processing_time":
            elapsed = self._required(obj, "elapsed_seconds")
            phase = _text(obj.get("phase")) or "inline"
            self._runs_by_phase[phase] += 1
            if elapsed is not None:
                self._runs.append(elapsed)
            if phase == "inline":
                if msg is not None:
                    msg.inline_ai = elapsed
                else:
                    self._pending_ai = elapsed
            elif phase == "followup" and msg is not None:
                msg.followup_answer = True
        elif name == "ai_timeout":
            self._timeouts += 1
            elapsed = self._required(obj, "elapsed_seconds")
            limit = _duration(obj.get("timeout_seconds"))
            if limit is not None:
                self._current_deadline = limit
            if msg is not None:
                msg.timed_out, msg.timeout_elapsed, msg.timeout_seconds = True, elapsed, limit
            else:
                self._idless_unknown.append(limit if limit is not None else elapsed)
                self._pending_ai = elapsed
        elif name == "ai_error_in_timeout":
            phase = _text(obj.get("phase")) or "inline"
            self._errors_by_type[_text(obj.get("error_type")) or "unknown"] += 1
            self._errors_by_phase[phase] += 1
            if msg is not None and phase == "followup":
                msg.followup_error = True
            elif msg is None:
                # The message ended in an error: its total_time is no overhead sample.
                self._pending_ai = None
        elif name == "total_time":
            total = self._required(obj, "total_time")
            outcome = _text(obj.get("outcome"))
            self._outcomes[outcome or "unknown"] += 1
            if total is not None:
                self._totals.append(total)
            if msg is not None:
                if msg.total is None:
                    msg.total, msg.outcome = total, outcome
            else:
                if self._pending_ai is not None and total is not None and outcome != "error":
                    overhead = total - self._pending_ai
                    if overhead >= 0:
                        self._idless_overheads.append(overhead)
                self._pending_ai = None
        elif name == "followup_sent":
            self._followups_by_kind[_text(obj.get("kind")) or "unknown"] += 1
        elif name == "followup_failed":
            self._followups_failed += 1
        elif name == "webhook_rejected":
            # Under a flood a line stands for itself and the `suppressed` rejections left out before it.
            suppressed = obj.get("suppressed")
            left_out = suppressed if isinstance(suppressed, int) and not isinstance(suppressed, bool) else 0
            self._rejections[_text(obj.get("reason")) or "unknown"] += 1 + max(left_out, 0)
        elif name == "message_status":
            self._statuses[(_text(obj.get("status")) or "unknown", _code(obj.get("error_code")))] += 1

    def _required(self, obj: dict[str, Any], name: str) -> float | None:
        value = _duration(obj.get(name))
        if value is None:
            self._bad_values += 1
        return value

    def _timestamp(self, value: Any) -> None:
        if not isinstance(value, str):
            return
        try:
            ts = datetime.fromisoformat(value.strip())
        except ValueError:
            return
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=UTC)
        if self._first_ts is None or ts < self._first_ts:
            self._first_ts = ts
        if self._last_ts is None or ts > self._last_ts:
            self._last_ts = ts

    def report(self) -> Report:
        """The report of everything fed so far."""
        overheads = list(self._idless_overheads)
        unknown = list(self._idless_unknown)
        for msg in self._messages.values():
            if msg.timed_out and not msg.followup_answer and not msg.followup_error:
                unknown.append(msg.timeout_seconds if msg.timeout_seconds is not None else msg.timeout_elapsed)
            overhead = _overhead(msg)
            if overhead is not None:
                overheads.append(overhead)

        total_events = self._events["total_time"]
        if total_events:
            messages, counted_from = total_events, "total_time"
        else:
            messages = self._runs_by_phase["inline"] + self._timeouts + self._errors_by_phase["inline"]
            counted_from = "ai_events" if messages else "none"
        sent = sum(self._followups_by_kind.values())
        attempted = sent + self._followups_failed
        return Report(
            lines_read=self._lines,
            bad_lines=self._bad,
            first_bad_lines=list(self._bad_refs),
            bad_values=self._bad_values,
            period_start=_iso(self._first_ts),
            period_end=_iso(self._last_ts),
            events=dict(sorted(self._events.items())),
            messages=messages,
            messages_counted_from=counted_from,
            outcomes=dict(sorted(self._outcomes.items())),
            timeouts=self._timeouts,
            timeout_ratio=self._timeouts / messages if messages else None,
            ai_errors=self._events["ai_error_in_timeout"],
            ai_errors_by_type=dict(sorted(self._errors_by_type.items())),
            ai_errors_by_phase=dict(sorted(self._errors_by_phase.items())),
            total_time_p50=percentile(self._totals, 50),
            total_time_p95=percentile(self._totals, 95),
            total_time_p99=percentile(self._totals, 99),
            total_time_max=max(self._totals, default=None),
            total_time_over_12s=sum(1 for t in self._totals if t > self._total_time.slow_s),
            total_time_over_15s=sum(1 for t in self._totals if t > self._total_time.twilio_limit_s),
            ai_runs=self._events["ai_processing_time"],
            ai_runs_inline=self._runs_by_phase["inline"],
            ai_runs_followup=self._runs_by_phase["followup"],
            ai_processing_p50=percentile(self._runs, 50),
            ai_processing_p95=percentile(self._runs, 95),
            ai_processing_p99=percentile(self._runs, 99),
            ai_processing_max=max(self._runs, default=None),
            followups_sent=sent,
            followups_failed=self._followups_failed,
            followup_delivery_rate=sent / attempted if attempted else None,
            followups_by_kind=dict(sorted(self._followups_by_kind.items())),
            rejections=dict(sorted(self._rejections.items())),
            message_statuses=dict(self._statuses),
            recommendation=recommend_deadline(
                self._runs,
                unknown,
                overheads,
                self._current_deadline,
                target_total=self._total_time.slow_s,
                twilio_limit=self._total_time.twilio_limit_s,
            ),
            media=self._media.summary(),
            spend=self._spend.report(),
        )


class SpendTally:
    """Cost per conversation and the most expensive hours, from the `ai_usage` events (one per run, with the user
    as `user_hash` only), and the `budget_refused` events.

    A conversation is a user's runs from one with `new_conversation` true to the next such one; runs of a user whose
    conversation started before the log did make one conversation too. Hours are UTC, from each event's timestamp
    (events without one count in the totals, not in the hours).
    """

    def __init__(self) -> None:
        self._runs = 0
        self._unpriced_runs = 0
        self._cost = 0.0
        self._tokens: Counter[str] = Counter()
        self._by_model: dict[str, float] = {}
        self._conversations: list[float] = []
        self._current: dict[str, int] = {}  # user_hash -> index of their current conversation
        self._hours: dict[str, float] = {}
        self._hour_runs: Counter[str] = Counter()
        self._refusals = 0
        self._notices = 0
        self._refused_users: set[str] = set()

    def event(self, name: str, obj: dict[str, Any]) -> None:
        if name == "budget_refused":
            self._refusals += 1
            self._notices += obj.get("notice") is True
            user = _text(obj.get("user_hash"))
            if user:
                self._refused_users.add(user)
            return
        if name != "ai_usage":
            return
        cost = _duration(obj.get("cost_usd")) or 0.0
        self._runs += 1
        self._cost += cost
        self._unpriced_runs += obj.get("priced") is False
        for direction in ("input_tokens", "cached_tokens", "output_tokens"):
            self._tokens[direction] += int(_duration(obj.get(direction)) or 0)
        model = _text(obj.get("model")) or "unknown"
        self._by_model[model] = self._by_model.get(model, 0.0) + cost
        user = _text(obj.get("user_hash")) or ""
        if obj.get("new_conversation") is True or user not in self._current or not user:
            self._current[user] = len(self._conversations)
            self._conversations.append(0.0)
        self._conversations[self._current[user]] += cost
        stamp = obj.get("timestamp")
        if isinstance(stamp, str):
            try:
                ts = datetime.fromisoformat(stamp.strip())
            except ValueError:
                return
            hour = (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:00Z")
            self._hours[hour] = self._hours.get(hour, 0.0) + cost
            self._hour_runs[hour] += 1

    def report(self) -> dict[str, Any]:
        conversations = self._conversations
        return {
            "runs": self._runs,
            "cost_usd": self._cost,
            "unpriced_runs": self._unpriced_runs,
            "tokens": {
                key.removesuffix("_tokens"): self._tokens[key]
                for key in ("input_tokens", "cached_tokens", "output_tokens")
            },
            "cost_usd_by_model": dict(sorted(self._by_model.items())),
            "conversations": len(conversations),
            "cost_per_conversation_mean": sum(conversations) / len(conversations) if conversations else None,
            "cost_per_conversation_p50": percentile(conversations, 50),
            "cost_per_conversation_p95": percentile(conversations, 95),
            "cost_per_conversation_max": max(conversations, default=None),
            "most_expensive_hours": [
                {"hour": hour, "cost_usd": cost, "runs": self._hour_runs[hour]}
                for hour, cost in sorted(self._hours.items(), key=lambda kv: (-kv[1], kv[0]))[:MOST_EXPENSIVE_HOURS]
            ],
            "budget_refusals": self._refusals,
            "budget_notices": self._notices,
            "budget_refused_users": len(self._refused_users),
        }


def _spend_rows(spend: dict[str, Any], section: Any, row: Any) -> None:
    section("Spend (ai_usage events)")
    if not spend.get("runs"):
        row("runs", "0")
    else:
        tokens = spend["tokens"]
        row(
            "runs",
            f"{spend['runs']}" + (f" ({spend['unpriced_runs']} of unpriced models)" if spend["unpriced_runs"] else ""),
        )
        row(
            "cost",
            _usd(spend["cost_usd"])
            + " ("
            + ", ".join(f"{m} {_usd(c)}" for m, c in spend["cost_usd_by_model"].items())
            + ")",
        )
        row("tokens", f"input {tokens['input']} (cached {tokens['cached']}), output {tokens['output']}")
        row("conversations", str(spend["conversations"]))
        row(
            "cost per conversation",
            f"mean {_usd(spend['cost_per_conversation_mean'])}, p50 {_usd(spend['cost_per_conversation_p50'])}, "
            f"p95 {_usd(spend['cost_per_conversation_p95'])}, max {_usd(spend['cost_per_conversation_max'])}",
        )
        for hour in spend["most_expensive_hours"]:
            row(f"hour {hour['hour']}", f"{_usd(hour['cost_usd'])} ({hour['runs']} runs)")
    row(
        "budget refusals",
        f"{spend.get('budget_refusals', 0)} ({spend.get('budget_notices', 0)} notices, "
        f"{spend.get('budget_refused_users', 0)} users)",
    )


def _usd(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6f} USD"


def analyze(lines: Iterable[str], thresholds: Thresholds = THRESHOLDS) -> Report:
    """Analyze log lines (one JSON event per line, prefixes and garbage tolerated) into a `Report`."""
    analyzer = Analyzer(thresholds)
    analyzer.feed(lines)
    return analyzer.report()


def render_table(report: Report, thresholds: Thresholds = THRESHOLDS) -> str:
    """A plain-text, aligned summary of the report for people (`thresholds`: the ones it was made with)."""
    lines = thresholds.total_time
    rows: list[tuple[str, str]] = []

    def section(title: str) -> None:
        rows.append((title, ""))

    def row(label: str, value: str) -> None:
        rows.append(("  " + label, value))

    section("Input")
    row("lines read", str(report.lines_read))
    bad = str(report.bad_lines)
    if report.first_bad_lines:
        bad += " (first: " + ", ".join(str(ref) for ref in report.first_bad_lines) + ")"
    row("bad lines", bad)
    if report.bad_values:
        row("unreadable values", str(report.bad_values))
    if report.period_start:
        row("period", f"{report.period_start} .. {report.period_end}")

    section("Messages")
    row(
        "messages",
        f"{report.messages}" + ("" if report.messages_counted_from != "ai_events" else " (from AI events)"),
    )
    if report.outcomes:
        row("outcomes", _counts(report.outcomes))
    row("timeouts", f"{report.timeouts} ({_pct(report.timeout_ratio)})")
    errors = str(report.ai_errors)
    if report.ai_errors_by_type:
        errors += f" ({_counts(report.ai_errors_by_type)})"
    row("AI errors", errors)

    section("Total time (arrival -> TwiML)")
    for label, value in (
        ("p50", report.total_time_p50),
        ("p95", report.total_time_p95),
        ("p99", report.total_time_p99),
        ("max", report.total_time_max),
    ):
        row(label, _secs(value))
    row(f"over {lines.slow_s:g} s", str(report.total_time_over_12s))
    row(f"over {lines.twilio_limit_s:g} s (Twilio drops)", str(report.total_time_over_15s))

    section("AI processing")
    row("runs", f"{report.ai_runs} (inline {report.ai_runs_inline}, followup {report.ai_runs_followup})")
    for label, value in (
        ("p50", report.ai_processing_p50),
        ("p95", report.ai_processing_p95),
        ("p99", report.ai_processing_p99),
        ("max", report.ai_processing_max),
    ):
        row(label, _secs(value))

    section("Follow-ups")
    sent = str(report.followups_sent)
    if report.followups_by_kind:
        sent += f" ({_counts(report.followups_by_kind)})"
    row("sent", sent)
    row("failed", str(report.followups_failed))
    row("delivery rate", _pct(report.followup_delivery_rate))

    section("Webhook rejections")
    row("total", str(sum(report.rejections.values())))
    for reason, count in report.rejections.items():
        row(reason, str(count))

    section("Message statuses")
    if not report.message_statuses:
        row("none", "")
    for (status, code), count in sorted(report.message_statuses.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        row(status if code is None else f"{status} ({code})", str(count))

    _media_rows(report.media, section, row)
    _spend_rows(report.spend, section, row)

    rec = report.recommendation
    section("Deadline recommendation")
    row("recommended deadline", _secs(rec.deadline_seconds))
    row("current deadline", _secs(rec.current_deadline_seconds))
    if rec.cut_off_share is not None:
        row(
            "cut off at recommended",
            f"{rec.cut_off_runs} of {rec.runs_considered} ({_pct(rec.cut_off_share)})",
        )
    if rec.current_cut_off_share is not None:
        row(
            "cut off at current",
            f"{rec.current_cut_off_runs} of {rec.runs_considered} ({_pct(rec.current_cut_off_share)})",
        )
    if rec.overhead_p99_seconds is not None:
        source = f"{rec.overhead_samples} samples" if rec.overhead_measured else "assumed"
        row("overhead p99", f"{_secs(rec.overhead_p99_seconds)} ({source})")
    row("reason", rec.reason)

    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}".rstrip() for label, value in rows) + "\n"


def _media_rows(media: MediaSummary, section: Callable[[str], None], row: Callable[[str, str], None]) -> None:
    """The "Attachments" and "Typing indicators" sections of the table."""
    section("Attachments")
    row("attachments", str(media.attachments))
    if media.outcomes:
        row("outcomes", _counts(media.outcomes))
    for kind, outcomes in media.by_kind.items():
        row(f"  {kind}", _counts(outcomes))
    row("failure share", f"{_pct(media.failure_ratio)} (download and transcription errors of those read)")
    if media.errors_by_type:
        row("errors", _counts(media.errors_by_type))
    row("download", _spread(media.fetch_p50, media.fetch_p95, media.fetch_max))
    row("transcriptions", str(media.transcriptions))
    row("transcription", _spread(media.transcription_p50, media.transcription_p95, media.transcription_max))

    section("Typing indicators")
    indicators = _counts(media.typing_indicators) or "none"
    row("indicators", f"{indicators} ({media.typing_refreshes} refreshes)")
    if media.typing_errors:
        row("errors", _counts(media.typing_errors))
    row(
        "arrival -> accepted",
        _spread(media.typing_first_p50, media.typing_first_p95, media.typing_first_max),
    )


def _spread(p50: float | None, p95: float | None, top: float | None) -> str:
    return f"p50 {_secs(p50)}, p95 {_secs(p95)}, max {_secs(top)}"


def run(
    paths: list[Path],
    *,
    as_json: bool,
    out: TextIO,
    err: TextIO | None = None,
    stdin: TextIO | None = None,
    thresholds: Thresholds = THRESHOLDS,
) -> int:
    """Analyze the files into one report written to ``out`` as JSON or as the table.

    Reads stdin when ``paths`` is empty or an entry is ``-``; ``*.gz`` files are decompressed. Returns 0, or 1
    when a file could not be read: each such file is named on ``err`` (stderr) and the report of the readable
    ones is still written.
    """
    err = err if err is not None else sys.stderr
    analyzer = Analyzer(thresholds)
    status = 0
    for path in paths or [Path(_STDIN)]:
        if str(path) == _STDIN:
            analyzer.feed(stdin if stdin is not None else sys.stdin, "<stdin>")
            continue
        try:
            # errors="replace": a stray binary byte makes one bad line, not a crash.
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
                analyzer.feed(handle, str(path))
        except (OSError, EOFError) as exc:
            print(f"wabot analyze: cannot read {path}: {getattr(exc, 'strerror', None) or exc}", file=err)
            status = 1
    report = analyzer.report()
    if as_json:
        out.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        out.write(render_table(report, thresholds))
    return status


def _overhead(msg: _Message) -> float | None:
    if msg.total is None or msg.outcome == "error":
        return None
    if msg.timed_out and msg.outcome in (None, "timeout"):
        ai = msg.timeout_elapsed
    elif msg.outcome in (None, "ok"):
        ai = msg.inline_ai
    else:
        ai = None
    if ai is None or msg.total < ai:
        return None
    return msg.total - ai


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str):
            number = float(value.strip())
        else:
            return None
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _duration(value: Any) -> float | None:
    number = _number(value)
    return number if number is not None and number >= 0 else None


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, dict | list):
        return None
    text = str(value).strip()
    return text or None


def _code(value: Any) -> str | None:
    # Twilio error codes arrive as 63016, "63016" or 63016.0 depending on the writer: one key for all.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return _text(value)


def _iso(ts: datetime | None) -> str | None:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z") if ts else None


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def _secs(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} {count}" for key, count in counts.items())
