"""Structured JSON logs: one line per event on stdout, each carrying the current trace and span ids.

Event names are a contract with dashboards, habits and `wabot analyze`: `ai_processing_time`, `ai_timeout`,
`ai_error_in_timeout`, `total_time`, `debug_response`, `followup_sent`, `followup_retry`, `followup_failed`,
`webhook_rejected` (`reason` = signature, malformed, too_large, disconnected, duplicate, rate_limited; `suppressed`
when lines were left out under a flood), `message_status`,
`runs_at_capacity`, `tool_error`, `store_error` (with `op`), `store_unwritable`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from opentelemetry import trace
from structlog.typing import EventDict, FilteringBoundLogger, Processor

# Libraries that log request bodies or numbers at INFO (twilio logs every request's form data).
_QUIET_LOGGERS = (
    "twilio",
    "httpx",
    "httpx2",
    "httpcore",
    "httpcore2",
    "openai",
    "aiosqlite",
    "asyncio",
    "urllib3",
)


def _add_trace_ids(_: Any, __: str, event_dict: EventDict) -> EventDict:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event_dict.setdefault("span_id", format(ctx.span_id, "016x"))
    else:
        event_dict.setdefault("trace_id", None)
        event_dict.setdefault("span_id", None)
    return event_dict


def _drop_console_extras(_: Any, __: str, event_dict: EventDict) -> EventDict:
    # uvicorn attaches an ANSI-coloured copy of its message for terminals; JSON lines do not want it.
    event_dict.pop("color_message", None)
    return event_dict


def setup_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Route structlog and the standard library's logging to one JSON-lines stream."""
    stream = stream or sys.stdout
    # No merge_contextvars: nothing binds context variables, and it copies the whole context on every line.
    shared: list[Processor] = [
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_ids,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # WriteLogger: PrintLogger's output without print()'s overhead, still flushed line by line.
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        # Through the lazy proxy every call (filtered-out debug lines too) built a new bound logger. Safe to cache:
        # this runs once per process, before the first log line.
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), _drop_console_extras],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # uvicorn's access log repeats what spans and metrics already say, without trace ids.
    logging.getLogger("uvicorn.access").disabled = True


def get_logger(name: str = "wabot") -> FilteringBoundLogger:
    """The structured logger; call it as `log.info("event_name", field=value)`."""
    logger: FilteringBoundLogger = structlog.get_logger(name)
    return logger
