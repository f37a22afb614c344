"""Warm the OpenAI SDK's code path at start-up, so the first user after a start does not pay for it.

The SDK imports its Responses types lazily and pydantic builds their validators on first use: the first model
call of a process paid for that inside its user's reply deadline (measured in docs/reliability.md). One call
through the SDK against an in-memory transport, before the webhook is served, does that work once. Nothing
leaves the process.
"""

from __future__ import annotations

import json
import time

import httpx2
from openai import AsyncOpenAI
from openai.types.responses import FunctionToolParam, ResponseInputParam

_MODEL = "warm-up"


def _response(output: list[dict[str, object]]) -> dict[str, object]:
    """A completed Response with every field OpenAI's reference requires (tests/test_warmup.py checks it)."""
    return {
        "id": "resp_warmup",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "metadata": {},
        "model": _MODEL,
        "output": output,
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "usage": {
            "input_tokens": 1,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": 1,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 2,
        },
    }


_TOOL_CALL: dict[str, object] = {
    "type": "function_call",
    "id": "fc_warmup",
    "call_id": "call_warmup",
    "name": "warm_up",
    "arguments": "{}",
    "status": "completed",
}
_MESSAGE: dict[str, object] = {
    "type": "message",
    "id": "msg_warmup",
    "role": "assistant",
    "status": "completed",
    "content": [{"type": "output_text", "text": "ok", "annotations": [], "logprobs": []}],
}


def _answer(request: httpx2.Request) -> httpx2.Response:
    """A tool call for the first request, a message once the request carries the tool's output (as a run goes)."""
    carries_output = "function_call_output" in request.content.decode("utf-8")
    body = _response([_MESSAGE] if carries_output else [_TOOL_CALL])
    return httpx2.Response(200, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


async def warm_up_openai(tools: list[FunctionToolParam]) -> None:
    """Run the SDK's request building and response parsing for a tool round and an answer, in memory."""
    http = httpx2.AsyncClient(transport=httpx2.MockTransport(_answer))
    client = AsyncOpenAI(api_key="warm-up", base_url="http://warm-up.invalid/v1", http_client=http, max_retries=0)
    try:
        first = await client.responses.create(model=_MODEL, input="warm up", tools=tools)
        output: ResponseInputParam = [{"type": "function_call_output", "call_id": "call_warmup", "output": "{}"}]
        await client.responses.create(model=_MODEL, input=output, previous_response_id=first.id)
    finally:
        await client.close()
