"""The AI run: OpenAI's Responses API with function tools, a bounded tool loop, and a hard time budget.

One run = one `invoke_agent` span with a `chat {model}` span per model call and an `execute_tool {name}` span
per tool call (GenAI semantic conventions). The budget is enforced here with `asyncio.timeout`, so the span
knows a timeout from a cancellation and ends with `error.type` either way.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import httpx2
import openai
from openai import AsyncOpenAI, DefaultAioHttpClient
from openai.types.responses import Response, ResponseFunctionToolCall, ResponseInputParam, ResponseUsage
from openai.types.responses.response_input_param import FunctionCallOutput
from opentelemetry import trace

from bot.settings import Settings
from bot.tls import tls_context
from bot.tools import ToolError, ToolRegistry
from telemetry import metrics, spend
from telemetry.logging import get_logger
from telemetry.tracing import ActiveSpan, record_error

PROVIDER = "openai"
TOOL_TIMEOUT_S = 10.0
_log = get_logger("wabot")


class AgentError(Exception):
    """The run ended without an answer. `error_type` is one of a small fixed set (a metric label)."""

    def __init__(self, error_type: str, message: str = "") -> None:
        super().__init__(message or error_type)
        self.error_type = error_type


@dataclass(frozen=True)
class AgentResult:
    """The model's final text after the tool loop, the response id that continues the conversation, the tool calls
    it took."""

    text: str
    response_id: str
    tool_count: int


def make_client(settings: Settings) -> AsyncOpenAI:
    """An SDK client whose single attempt can never outlive the follow-up budget.

    Its HTTP layer is the SDK's aiohttp transport: with a thousand calls in flight the default httpx pool spent
    more CPU managing connections than anything else in the process, delaying webhooks that were due
    (profile in docs/reliability.md).
    """
    timeout = httpx2.Timeout(settings.followup_timeout, connect=5.0)
    return AsyncOpenAI(
        api_key=settings.secret("openai_api_key") or "unset",
        base_url=settings.openai_base_url,
        timeout=timeout,
        max_retries=2,
        http_client=DefaultAioHttpClient(timeout=timeout, verify=tls_context()),
    )


def classify(exc: BaseException) -> str:
    """The `outcome` label of a failed model call (APITimeoutError first: it is a connection error too)."""
    if isinstance(exc, openai.APITimeoutError | TimeoutError | asyncio.CancelledError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection_error"
    if isinstance(exc, openai.RateLimitError):
        return "rate_limited"
    if isinstance(exc, openai.InternalServerError):
        return "server_error"
    return "other"


def _is_lost_conversation(exc: openai.APIStatusError) -> bool:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    return isinstance(error, dict) and (
        error.get("code") == "previous_response_not_found" or error.get("param") == "previous_response_id"
    )


class Agent:
    """Runs one user turn against the model, calling tools until the model answers in text."""

    def __init__(
        self,
        client: AsyncOpenAI,
        settings: Settings,
        tools: ToolRegistry,
        tracer: trace.Tracer,
    ) -> None:
        self._client = client
        self._model = settings.model
        self._instructions = settings.instructions
        self._max_tool_rounds = settings.max_tool_rounds
        self._max_output_tokens = settings.max_output_tokens
        self._tools = tools
        self._tool_body: dict[str, object] = {"tools": tools.specs()}
        self._tracer = tracer

    async def run(
        self,
        prompt: str | ResponseInputParam,
        previous_response_id: str | None,
        budget_s: float,
        spent: spend.RunUsage | None = None,
    ) -> AgentResult:
        """Answer `prompt` (text, or input items with media parts) within `budget_s` seconds or raise AgentError.
        Every model call's usage is counted (telemetry/spend.py) and added to `spent`, failed runs' calls included."""
        with ActiveSpan(
            self._tracer,
            "invoke_agent",
            attributes={
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.provider.name": PROVIDER,
                "gen_ai.agent.name": "wabot",
                "gen_ai.request.model": self._model,
            },
        ) as span:
            usage = _Usage(self._model, spent if spent is not None else spend.RunUsage())
            try:
                async with asyncio.timeout(budget_s) as usage.deadline:
                    answer = await self._loop(prompt, previous_response_id, usage, span)
            except TimeoutError:
                record_error(span, "timeout")
                raise AgentError("timeout", f"no answer within {budget_s:.1f} s") from None
            except AgentError as exc:
                record_error(span, exc.error_type)
                raise
            except asyncio.CancelledError:
                record_error(span, "cancelled")
                raise
            except Exception as exc:
                record_error(span, exc.__class__.__name__)
                raise AgentError("other", str(exc)) from exc
            finally:
                span.set_attributes(
                    {"gen_ai.usage.input_tokens": usage.input_tokens, "gen_ai.usage.output_tokens": usage.output_tokens}
                )
            return answer

    async def _loop(
        self, prompt: str | ResponseInputParam, previous_response_id: str | None, usage: _Usage, span: trace.Span
    ) -> AgentResult:
        # The first call inline, not in a coroutine of its own, and no comprehension around an await (it would make
        # `self` a cell): every frame and object here is held by each run waiting on the model (docs/benchmarks.md).
        try:
            response = await self._call(prompt, previous_response_id, usage)
        except openai.BadRequestError as exc:
            # A conversation the provider no longer keeps (expired, or another account) must not make the
            # user's message fail: answer it as the start of a new conversation.
            if not (previous_response_id and _is_lost_conversation(exc)):
                raise
            response = await self._call(prompt, None, usage)
        tool_count = 0
        for _round in range(self._max_tool_rounds + 1):
            calls = [item for item in response.output if item.type == "function_call"]
            if not calls:
                break
            if _round == self._max_tool_rounds:
                raise AgentError("tool_error", f"still calling tools after {self._max_tool_rounds} rounds")
            outputs: ResponseInputParam = []
            for call in calls:
                outputs.append(await self._execute_tool(call))
            tool_count += len(calls)
            response = await self._call(outputs, response.id, usage)
        span.set_attributes(
            {
                "gen_ai.response.id": response.id,
                "gen_ai.response.model": response.model,
                "wabot.agent.tool_count": tool_count,
            }
        )
        text = (response.output_text or "").strip()
        if response.status == "incomplete":
            # Cut by WABOT_MAX_OUTPUT_TOKENS (or a content filter): the text written so far is the answer.
            reason = response.incomplete_details.reason if response.incomplete_details else None
            span.set_attribute("gen_ai.response.finish_reasons", [reason or "incomplete"])
            _log.warning("answer_incomplete", reason=reason, answer_chars=len(text))
        if not text:
            raise AgentError("empty", "the model answered with no text")
        return AgentResult(text=text, response_id=response.id, tool_count=tool_count)

    async def _call(
        self, input_: str | ResponseInputParam, previous_response_id: str | None, usage: _Usage
    ) -> Response:
        with ActiveSpan(
            self._tracer,
            f"chat {self._model}",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": PROVIDER,
                "gen_ai.request.model": self._model,
            },
        ) as span:
            try:
                response = await self._client.responses.create(
                    model=self._model,
                    instructions=self._instructions,
                    input=input_,
                    previous_response_id=previous_response_id,
                    max_output_tokens=self._max_output_tokens,
                    # A long conversation drops its oldest turns instead of failing once it outgrows the context.
                    truncation="auto",
                    # The same `tools` field, built once: given as `tools=`, the SDK walked the tools' JSON schemas
                    # against its type annotations on every call (~2/3 of the SDK's CPU per call, to return them
                    # unchanged: the Responses parameter types have no aliases or formats to apply).
                    extra_body=self._tool_body,
                )
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError) and not usage.deadline_expired():
                    # Cancelled from outside (shutdown), not by the run's budget: the call has no outcome to count.
                    record_error(span, "cancelled")
                    raise
                outcome = classify(exc)
                metrics.MODEL_CALLS.labels(outcome=outcome).inc()
                record_error(span, outcome if outcome != "other" else exc.__class__.__name__)
                if isinstance(exc, openai.APIError) and not isinstance(exc, openai.BadRequestError):
                    raise AgentError(outcome, str(exc)) from exc
                raise
            metrics.MODEL_CALLS.labels(outcome="ok").inc()
            done: dict[str, Any] = {"gen_ai.response.id": response.id, "gen_ai.response.model": response.model}
            if response.usage is not None:
                usage.add(response.usage)
                done["gen_ai.usage.input_tokens"] = response.usage.input_tokens
                done["gen_ai.usage.output_tokens"] = response.usage.output_tokens
            span.set_attributes(done)
            return response

    async def _execute_tool(self, call: ResponseFunctionToolCall) -> FunctionCallOutput:
        tool = self._tools.get(call.name)
        label = tool.name if tool else "unknown"
        with ActiveSpan(
            self._tracer,
            f"execute_tool {label}",
            attributes={
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": label,
                "gen_ai.tool.call.id": call.call_id,
            },
        ) as span:
            try:
                if tool is None:
                    raise ToolError(f"there is no tool named {call.name!r}")
                arguments = json.loads(call.arguments or "{}")
                if not isinstance(arguments, dict):
                    raise ToolError("arguments must be a JSON object")
                async with asyncio.timeout(TOOL_TIMEOUT_S):
                    result: Any = await tool.func(**arguments)
                # Inside the try: a result JSON cannot carry (a huge integer, an object) is the tool failing.
                output = json.dumps(result)
                error_type = None
            except (ToolError, TypeError, ValueError, TimeoutError) as exc:
                # A failing tool is the model's problem to explain, not a failed run.
                output = json.dumps({"error": str(exc) or exc.__class__.__name__})
                error_type = exc.__class__.__name__
                record_error(span, error_type)
            except Exception as exc:
                output = json.dumps({"error": "the tool failed unexpectedly"})
                error_type = exc.__class__.__name__
                record_error(span, error_type)
            metrics.TOOL_CALLS.labels(tool=label, outcome="ok" if error_type is None else "error").inc()
            if error_type is not None:
                # The error text may quote the user's arguments, so only its type is logged (as for bodies).
                _log.warning("tool_error", tool=label, error_type=error_type)
            return {"type": "function_call_output", "call_id": call.call_id, "output": output}


class _Usage:
    """Per-run state of the tool loop: token counts summed over it, and the run's budget (`asyncio.timeout`)."""

    def __init__(self, model: str, spent: spend.RunUsage) -> None:
        self._model = model
        self.spent = spent
        self.deadline: asyncio.Timeout | None = None

    @property
    def input_tokens(self) -> int:
        return self.spent.input_tokens

    @property
    def output_tokens(self) -> int:
        return self.spent.output_tokens

    def deadline_expired(self) -> bool:
        """True when a cancellation inside the run comes from its own budget running out."""
        return self.deadline is not None and self.deadline.expired()

    def add(self, usage: ResponseUsage) -> None:
        # Priced on the model asked for: the response names a dated snapshot of it.
        self.spent.add(spend.record(self._model, usage))
