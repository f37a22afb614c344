"""What the model calls cost: the price table, and the one place every call's token usage is counted.

Every model call's usage goes through `record(model, usage)`: it adds the tokens to `wabot_tokens_total{direction,
model}` and their price to `wabot_cost_usd_total{model}`, and returns the call's `CallCost` for the caller's own
accounting (the run's `ai_usage` log event, the user's daily tokens in the store).

Prices are USD per million tokens: input, cached input, output. The defaults are OpenAI's list prices for the models
the README suggests; `WABOT_PRICES` overrides or adds models (`parse_prices` documents its format). The `model` label
only takes a name of the price table (a dated snapshot such as `gpt-4.1-mini-2025-04-14` counts as its model), or
`other` for a model without a price: its tokens are counted, its cost is not (it is unknown), and the first call of
each such model in a process logs `model_unpriced`.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from telemetry import metrics
from telemetry.logging import get_logger
from telemetry.thresholds import THRESHOLDS

UNPRICED: Final = "other"
DIRECTIONS: Final = ("input", "cached_input", "output")
_SNAPSHOT = re.compile(r"^(?P<model>.+)-\d{4}-\d{2}-\d{2}$")
_log = get_logger("wabot")


@dataclass(frozen=True)
class Price:
    """USD per million tokens. Cached input tokens are part of the input tokens, priced at `cached_input` instead."""

    input: float
    cached_input: float
    output: float


# OpenAI's published list prices (standard tier) when this table was written: defaults to check against the
# operator's own invoice, overridable with WABOT_PRICES. The transcription model's "input" is its audio input price
# (its usage reports audio and text input together); it has no cached-input discount.
DEFAULT_PRICES: Final[Mapping[str, Price]] = MappingProxyType(
    {
        "gpt-4.1": Price(2.00, 0.50, 8.00),
        "gpt-4.1-mini": Price(0.40, 0.10, 1.60),
        "gpt-4.1-nano": Price(0.10, 0.025, 0.40),
        "gpt-4o": Price(2.50, 1.25, 10.00),
        "gpt-4o-mini": Price(0.15, 0.075, 0.60),
        "gpt-4o-mini-transcribe": Price(3.00, 3.00, 5.00),
    }
)


def parse_prices(text: str) -> dict[str, Price]:
    """The price table of a `WABOT_PRICES` value laid over the defaults.

    Format: comma-separated `model=input/cached_input/output`, USD per million tokens, e.g.
    `gpt-4.1-mini=0.40/0.10/1.60,my-finetune=0.80/0.20/3.20`. Empty: the defaults. ValueError, naming the entry,
    for anything else (a missing field, a negative or non-finite number, a model given twice).
    """
    table = dict(DEFAULT_PRICES)
    seen: set[str] = set()
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        model, eq, numbers = (part.strip() for part in entry.partition("="))
        fields = numbers.split("/")
        if not eq or not model or len(fields) != 3:
            raise ValueError(f"WABOT_PRICES entry {entry!r}: expected model=input/cached_input/output (USD per 1M)")
        if model == UNPRICED or model in seen:
            raise ValueError(f"WABOT_PRICES entry {entry!r}: model {model!r} is reserved or given twice")
        try:
            values = [float(f) for f in fields]
        except ValueError:
            raise ValueError(f"WABOT_PRICES entry {entry!r}: prices must be numbers") from None
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"WABOT_PRICES entry {entry!r}: prices must be finite and not negative")
        seen.add(model)
        table[model] = Price(*values)
    return table


@dataclass(frozen=True)
class CallCost:
    """One model call's usage: `model` is its label (a priced model or `other`), `cost_usd` 0 when unpriced."""

    model: str
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    cost_usd: float
    priced: bool

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass
class RunUsage:
    """What one run (every model call answering one message) used, summed. Filled by `add`."""

    model: str = UNPRICED
    calls: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    priced: bool = True

    @property
    def tokens(self) -> int:
        """Input plus output tokens: what counts against WABOT_USER_DAILY_TOKENS."""
        return self.input_tokens + self.output_tokens

    def add(self, call: CallCost) -> None:
        self.model = call.model if self.calls == 0 else self.model
        self.calls += 1
        self.input_tokens += call.input_tokens
        self.cached_tokens += call.cached_tokens
        self.output_tokens += call.output_tokens
        self.cost_usd += call.cost_usd
        self.priced = self.priced and call.priced


class SpendWindow:
    """This process's spend in the status window (the alerts' 5 minutes) and today (UTC), for `/status`.

    Thread-safe (the metrics port reads it). Counted in `WINDOW_BUCKETS` time buckets, not per call: its memory is the
    same at 1 message a minute as at 1,000 a second, and nothing per call stays behind (the heap test's promise). The
    window's sums may include up to one bucket (a thirtieth of the window) of older calls.
    """

    WINDOW_BUCKETS = 30

    def __init__(self, window_s: float = THRESHOLDS.status_window_s, clock: Callable[[], float] = time.time) -> None:
        self.window_s = window_s
        self._width = window_s / self.WINDOW_BUCKETS
        self._clock = clock
        self._lock = threading.Lock()
        # [bucket number, cost, tokens, calls], oldest first; at most WINDOW_BUCKETS + 1 of them.
        self._buckets: deque[list[float]] = deque()
        self._day = ""
        self._today = [0.0, 0, 0]  # cost, tokens, unpriced tokens

    def add(self, call: CallCost) -> None:
        day = time.strftime("%Y-%m-%d", time.gmtime(self._clock()))
        bucket = int(time.monotonic() // self._width)
        with self._lock:
            if not self._buckets or self._buckets[-1][0] != bucket:
                self._buckets.append([bucket, 0.0, 0, 0])
                self._prune(bucket)
            last = self._buckets[-1]
            last[1] += call.cost_usd
            last[2] += call.tokens
            last[3] += 1
            if day != self._day:
                self._day, self._today = day, [0.0, 0, 0]
            self._today[0] += call.cost_usd
            self._today[1] += call.tokens
            self._today[2] += 0 if call.priced else call.tokens

    def _prune(self, bucket: int) -> None:
        while self._buckets and self._buckets[0][0] < bucket - self.WINDOW_BUCKETS:
            self._buckets.popleft()

    def snapshot(self) -> dict[str, Any]:
        day = time.strftime("%Y-%m-%d", time.gmtime(self._clock()))
        with self._lock:
            self._prune(int(time.monotonic() // self._width))
            buckets = [list(b) for b in self._buckets]
            today = self._today if day == self._day else [0.0, 0, 0]
        return {
            "window_s": self.window_s,
            "cost_usd_window": sum(b[1] for b in buckets),
            "tokens_window": int(sum(b[2] for b in buckets)),
            "model_calls_window": int(sum(b[3] for b in buckets)),
            "day": day,
            "cost_usd_today": today[0],
            "tokens_today": today[1],
            "unpriced_tokens_today": today[2],
        }


class _Prices:
    def __init__(self) -> None:
        self.table: Mapping[str, Price] = DEFAULT_PRICES
        self.flagged: set[str] = set()
        self.lock = threading.Lock()


_prices = _Prices()
_window = SpendWindow()


def window() -> SpendWindow:
    """This process's spend window (what `/status` shows)."""
    return _window


def configure(table: Mapping[str, Price], models: tuple[str, ...] = ()) -> None:
    """Use `table` from now on; pre-create the token and cost series of `models` (the configured ones) at 0."""
    _prices.table = MappingProxyType(dict(table))
    for model in models:
        label = model_label(model)
        for direction in DIRECTIONS:
            metrics.TOKENS.labels(direction=direction, model=label)
        if label != UNPRICED:
            metrics.COST.labels(model=label)


def prices() -> Mapping[str, Price]:
    """The price table in use."""
    return _prices.table


def model_label(model: str) -> str:
    """The `model` label of a model name: its price-table name, or `other` when it has no price."""
    if model in _prices.table:
        return model
    snapshot = _SNAPSHOT.match(model)
    if snapshot and snapshot.group("model") in _prices.table:
        return snapshot.group("model")
    return UNPRICED


def _tokens(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def record(model: str, usage: Any) -> CallCost:
    """Count one model call's usage in the token and cost metrics and return it priced.

    `model` is the model the call asked for (WABOT_MODEL, WABOT_TRANSCRIBE_MODEL); `usage` is the SDK's usage object
    of the call: a Responses `ResponseUsage` (`input_tokens`, `input_tokens_details.cached_tokens`,
    `output_tokens`), or a transcription's `usage` (`input_tokens`, `output_tokens`; a duration-only usage counts no
    tokens). `None` (no usage reported) counts nothing. The transcription of a voice note calls
    `spend.record(settings.transcribe_model, transcription.usage)` and adds the result to its run's `RunUsage`.
    """
    label = model_label(model)
    input_tokens = _tokens(getattr(usage, "input_tokens", 0))
    output_tokens = _tokens(getattr(usage, "output_tokens", 0))
    details = getattr(usage, "input_tokens_details", None)
    cached = min(_tokens(getattr(details, "cached_tokens", 0)), input_tokens)
    price = _prices.table.get(label)
    cost = 0.0
    if price is not None:
        fresh = input_tokens - cached
        cost = (fresh * price.input + cached * price.cached_input + output_tokens * price.output) / 1e6
        metrics.COST.labels(model=label).inc(cost)
    elif usage is not None:
        with _prices.lock:
            first = model not in _prices.flagged
            _prices.flagged.add(model)
        if first:
            # The model name is configuration, not user data; its tokens are still counted, under model="other".
            _log.warning("model_unpriced", model=model, hint="add it to WABOT_PRICES to count its cost")
    metrics.TOKENS.labels(direction="input", model=label).inc(input_tokens)
    metrics.TOKENS.labels(direction="cached_input", model=label).inc(cached)
    metrics.TOKENS.labels(direction="output", model=label).inc(output_tokens)
    call = CallCost(label, input_tokens, cached, output_tokens, cost, price is not None)
    _window.add(call)
    return call
