"""Prometheus metrics of the bot: the exact names the alert rules and dashboards are written against.

Every seconds histogram uses the same buckets, chosen so each alert threshold (8 s deadline, 12 s, 15 s Twilio limit)
sits on a bucket edge and "slower than 12 s" is a count, not an estimate. The lines are in telemetry/thresholds.py;
alerts/generate.py refuses one that is not an edge here.

Label values are all from small fixed sets; nothing user-specific is ever a label.
"""

from __future__ import annotations

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

SECONDS_BUCKETS = (0.25, 0.5, 1, 2, 4, 6, 8, 10, 12, 15, 20, 30, 60, 120)

AI_RUNS = Counter(
    "wabot_ai_runs_total",
    "AI runs started for an inbound message, by the outcome of their deadline race "
    "(ok = answered inline, timeout = holding reply sent, error = failed before the deadline, "
    "busy = every model slot taken: holding reply at once, the run waits for a slot).",
    ["outcome"],
)
AI_PROCESSING = Histogram(
    "wabot_ai_processing_seconds",
    "AI run time until the answer, or until the deadline for runs that timed out.",
    buckets=SECONDS_BUCKETS,
)
AI_ERRORS = Counter(
    "wabot_ai_errors_total",
    "AI runs that ended without an answer (the user got an apology), before (inline) or after (followup) "
    "the deadline. Every one is an `ai_error_in_timeout` log event.",
    ["phase", "error_type"],
)
RESPONSE = Histogram(
    "wabot_response_seconds",
    "Webhook total time, request arrival to TwiML sent (the seed's total_time).",
    buckets=SECONDS_BUCKETS,
)
FOLLOWUPS = Counter(
    "wabot_followups_total",
    "Follow-up deliveries through Twilio's REST API (answer or apology after a holding reply).",
    ["outcome"],
)
FOLLOWUP_SECONDS = Histogram(
    "wabot_followup_seconds",
    "Inbound message arrival until its follow-up was accepted by Twilio.",
    buckets=SECONDS_BUCKETS,
)
FOLLOWUPS_PENDING = Gauge(
    "wabot_followups_pending",
    "Follow-ups promised by a holding reply and not yet delivered or given up.",
    multiprocess_mode="livesum",
)
MODEL_CALLS = Counter(
    "wabot_model_calls_total",
    "Calls to the model API by outcome.",
    ["outcome"],
)
TOOL_CALLS = Counter(
    "wabot_tool_calls_total",
    "Function tool executions by tool and outcome.",
    ["tool", "outcome"],
)
TOKENS = Counter(
    "wabot_tokens_total",
    "Model tokens used, by direction (input: every input token, cached ones included; cached_input: the part of "
    "the input served from OpenAI's prompt cache; output) and model (a model of the price table, or other).",
    ["direction", "model"],
)
COST = Counter(
    "wabot_cost_usd_total",
    "What the model calls cost in USD at the price table's prices (WABOT_PRICES), by model. Models without a price "
    'count no cost: their tokens are counted under model="other".',
    ["model"],
)
DAILY_BUDGET = Gauge(
    "wabot_daily_budget_usd",
    "The operator's daily spend budget in USD (WABOT_DAILY_BUDGET_USD); 0 = none, and the spend alerts stay silent.",
    multiprocess_mode="max",
)
USER_DAILY_TOKENS = Gauge(
    "wabot_user_daily_tokens",
    "The per-user daily token budget (WABOT_USER_DAILY_TOKENS); 0 = none.",
    multiprocess_mode="max",
)
BUDGET_REFUSALS = Counter(
    "wabot_budget_refusals_total",
    "Messages not answered by the model because their user was over WABOT_USER_DAILY_TOKENS today (the first of "
    "the day got a notice, the rest an empty reply). Each is a `budget_refused` log event.",
)
CONVERSATIONS = Counter(
    "wabot_conversations_total",
    "Conversations started: a user's first answered message, or the first after WABOT_CONVERSATION_TTL of silence.",
)
ANSWERS_SHORTENED = Counter(
    "wabot_answers_shortened_total",
    "Answers cut at WABOT_MAX_REPLY_PARTS messages (the last part ends with the shortened marker); each is an "
    "`answer_shortened` log event.",
)
REPLY_PARTS = Counter(
    "wabot_reply_parts_total",
    "WhatsApp messages sent as parts of the model's answers (inline TwiML <Message>s and REST follow-up parts "
    "Twilio accepted; holding replies, notices and apologies are not counted). Each is a paid message; one answer "
    "takes at most WABOT_MAX_REPLY_PARTS, and a cut answer is an `answer_shortened` log event.",
)
MEDIA = Counter(
    "wabot_media_total",
    "Attachments of inbound messages (MediaUrl{i}) by kind and what became of them "
    "(ok = handed to the model; the others end in a reply that says what went wrong).",
    ["kind", "outcome"],
)
MEDIA_FETCH_SECONDS = Histogram(
    "wabot_media_fetch_seconds",
    "Time to download one attachment from Twilio, redirects included, failed downloads included.",
    buckets=SECONDS_BUCKETS,
)
TRANSCRIPTION_SECONDS = Histogram(
    "wabot_transcription_seconds",
    "Time of one call to the transcription endpoint for a voice note, failed calls included.",
    buckets=SECONDS_BUCKETS,
)
TYPING_INDICATORS = Counter(
    "wabot_typing_indicators_total",
    "WhatsApp typing indicators sent through Twilio for messages accepted for a model run, refreshes included.",
    ["outcome"],
)
TYPING_INDICATOR_SECONDS = Histogram(
    "wabot_typing_indicator_seconds",
    "Inbound message arrival until Twilio accepted its first typing indicator.",
    buckets=SECONDS_BUCKETS,
)
REJECTIONS = Counter(
    "wabot_webhook_rejections_total",
    "Webhook requests not processed, by reason.",
    ["reason"],
)
RUNS_ACTIVE = Gauge(
    "wabot_runs_active",
    "AI runs holding one of the WABOT_MAX_CONCURRENT_RUNS model slots.",
    multiprocess_mode="livesum",
)
RUNS_QUEUED = Gauge(
    "wabot_runs_queued",
    "AI runs waiting for a free model slot (their users got the busy holding reply).",
    multiprocess_mode="livesum",
)
MAX_CONCURRENT_RUNS = Gauge(
    "wabot_max_concurrent_runs",
    "The configured cap on concurrent AI runs per process (WABOT_MAX_CONCURRENT_RUNS).",
    multiprocess_mode="max",
)
MESSAGE_STATUS = Counter(
    "wabot_message_status_total",
    "Twilio status callbacks for our outbound messages, by status and Twilio error code ('' when none).",
    ["status", "error_code"],
)
STORE_ERRORS = Counter(
    "wabot_store_errors_total",
    "Store operations that failed (SQLite locked or full, Redis unreachable), by operation. The bot keeps answering "
    "without them; every one the reply path notices is also a `store_error` log event.",
    ["op"],
)
BUILD_INFO = Gauge(
    "wabot_build_info",
    "Always 1; the version label says which build is running.",
    ["version"],
    multiprocess_mode="max",
)
REPLY_TIMEOUT = Gauge(
    "wabot_reply_timeout_seconds",
    "The configured reply deadline (WABOT_REPLY_TIMEOUT).",
    multiprocess_mode="max",
)

MEDIA_KINDS = ("audio", "image", "document", "other")
MEDIA_OUTCOMES = ("ok", "too_large", "unsupported", "fetch_error", "transcribe_error")
TYPING_OUTCOMES = ("sent", "failed")
MODEL_CALL_OUTCOMES = ("ok", "rate_limited", "server_error", "timeout", "connection_error", "other")
RUN_OUTCOMES = ("ok", "timeout", "error", "busy")
FOLLOWUP_OUTCOMES = ("delivered", "failed")
REJECTION_REASONS = ("signature", "malformed", "too_large", "disconnected", "duplicate", "rate_limited")
AI_ERROR_PHASES = ("inline", "followup")
AI_ERROR_TYPES = ("timeout", "rate_limited", "server_error", "connection_error", "tool_error", "empty", "other")
STORE_OPS = (
    "accept",
    "drop",
    "save_answer",
    "mark_sent",
    "count_message",
    "get_conversation",
    "set_conversation",
    "claim_orphans",
    "wait_turn",
    "release_turn",
    "renew_lease",
    "tokens_today",
    "add_tokens",
    "claim_budget_notice",
)


_multiprocess = False


def multiprocess_enabled() -> bool:
    """True when several worker processes share metrics through PROMETHEUS_MULTIPROC_DIR."""
    return _multiprocess


def init(
    version: str, reply_timeout_s: float, *, max_concurrent_runs: int = 0, multiprocess_dir: str | None = None
) -> None:
    """Set the static series and pre-create every labelled series so rates start at 0, not absent.

    prometheus-client itself picks multiprocess mode from PROMETHEUS_MULTIPROC_DIR at import; the settings
    pass the same value here so exposition aggregates across workers.
    """
    global _multiprocess
    _multiprocess = bool(multiprocess_dir)
    BUILD_INFO.labels(version=version).set(1)
    REPLY_TIMEOUT.set(reply_timeout_s)
    MAX_CONCURRENT_RUNS.set(max_concurrent_runs)
    for outcome in RUN_OUTCOMES:
        AI_RUNS.labels(outcome=outcome)
    for outcome in FOLLOWUP_OUTCOMES:
        FOLLOWUPS.labels(outcome=outcome)
    for outcome in MODEL_CALL_OUTCOMES:
        MODEL_CALLS.labels(outcome=outcome)
    for reason in REJECTION_REASONS:
        REJECTIONS.labels(reason=reason)
    for phase in AI_ERROR_PHASES:
        for error_type in AI_ERROR_TYPES:
            AI_ERRORS.labels(phase=phase, error_type=error_type)
    for op in STORE_OPS:
        STORE_ERRORS.labels(op=op)
    for kind in MEDIA_KINDS:
        for outcome in MEDIA_OUTCOMES:
            MEDIA.labels(kind=kind, outcome=outcome)
    for outcome in TYPING_OUTCOMES:
        TYPING_INDICATORS.labels(outcome=outcome)


def _exemplar() -> dict[str, str] | None:
    # Exemplars are not supported by the multiprocess collector; asking for one there raises.
    if multiprocess_enabled():
        return None
    ctx = trace.get_current_span().get_span_context()
    # A trace the sampler dropped is never exported: an exemplar pointing at it would lead nowhere.
    if not ctx.is_valid or not ctx.trace_flags.sampled:
        return None
    return {"trace_id": format(ctx.trace_id, "032x")}


def observe(histogram: Histogram, seconds: float) -> None:
    """Observe a duration with the current trace as exemplar, so a slow bucket links to its trace."""
    histogram.observe(seconds, exemplar=_exemplar())


def exposition(accept_header: str) -> tuple[bytes, str]:
    """Render all metrics; OpenMetrics (with exemplars) when the scraper asks for it."""
    if multiprocess_enabled():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY as registry
    if "application/openmetrics-text" in accept_header:
        return generate_openmetrics(registry), OPENMETRICS_CONTENT_TYPE
    return generate_latest(registry), CONTENT_TYPE_LATEST
