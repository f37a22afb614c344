"""The OpenAI simulator, driven over real HTTP on 127.0.0.1 by the real openai SDK."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2
import openai
import pytest
from openai.types.responses import Response

from bot.demo import audio
from bot.demo.audio import inspect, voice_note
from bot.demo.loopback import LoopbackServer
from bot.demo.openai_simulator import OpenAISimulator, parse_directives
from bot.tools import registry
from tests.conftest import CLIENT_TLS
from tests.media_samples import jpeg_header, pdf, png, webp_header

MODEL = "gpt-sim"
TOOLS = [
    {
        "type": "function",
        "name": "lookup",
        "description": "Look something up.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": []},
        "strict": False,
    }
]


@pytest.fixture(scope="module")
def sim_server() -> Iterator[tuple[OpenAISimulator, str]]:
    sim = OpenAISimulator(elon_musk_delay=0.2, seed=7, echo=True)
    server = LoopbackServer(sim.app, name="openai-sim")
    url = server.start()
    yield sim, url
    sim.shutdown()
    server.stop()


@pytest.fixture
def sim(sim_server: tuple[OpenAISimulator, str]) -> OpenAISimulator:
    simulator = sim_server[0]
    simulator.clear_calls()
    simulator.set_mode("instant")
    return simulator


def sdk_client(url: str, *, max_retries: int = 0, **options: Any) -> openai.AsyncOpenAI:
    """The real SDK against the simulator at `url`, on the suite's shared TLS context; no retries unless asked."""
    http = openai.DefaultAsyncHttpxClient(verify=CLIENT_TLS)
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=max_retries, http_client=http, **options)


@pytest.fixture
def url(sim_server: tuple[OpenAISimulator, str]) -> str:
    return sim_server[1]


@pytest.fixture
async def client(url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with sdk_client(url, timeout=5.0) as c:
        yield c


def unique(text: str) -> str:
    """Texts carry a nonce: flaky counters are per text and the simulator lives for the whole module."""
    return f"{text} #{uuid.uuid4().hex[:6]}"


async def test_echo_counts_turns_along_previous_response_id(sim: OpenAISimulator, client: openai.AsyncOpenAI) -> None:
    r1 = await client.responses.create(model=MODEL, input="hello there", instructions="be brief")
    assert r1.output_text == "[turn 1] hello there"
    assert r1.id.startswith("resp_") and r1.status == "completed" and r1.model == MODEL
    assert r1.usage is not None
    assert (r1.usage.input_tokens, r1.usage.output_tokens, r1.usage.total_tokens) == (2, 4, 6)

    r2 = await client.responses.create(
        model=MODEL,
        previous_response_id=r1.id,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "second one"}]}],
    )
    assert r2.output_text == "[turn 2] second one"
    assert r2.previous_response_id == r1.id

    r3 = await client.responses.create(model=MODEL, previous_response_id=r2.id, input="what was my FIRST MESSAGE?")
    assert r3.output_text == "Your first message was: hello there"

    # A branch from r1 has its own turn count.
    branch = await client.responses.create(model=MODEL, previous_response_id=r1.id, input="other branch")
    assert branch.output_text == "[turn 2] other branch"


async def test_body_passes_validation_and_has_every_required_field(url: str) -> None:
    required = {"id", "object", "created_at", "model", "output", "parallel_tool_calls", "tool_choice"}
    required |= {"tools", "usage", "status"}
    async with httpx2.AsyncClient(base_url=url, headers={"Authorization": "Bearer x"}, verify=CLIENT_TLS) as http:
        for text in ("plain text", '[sim:tool=lookup:{"q": "[x]"}] go'):
            reply = await http.post("/v1/responses", json={"model": MODEL, "input": text, "tools": TOOLS})
            assert reply.status_code == 200
            raw = reply.json()
            assert required <= raw.keys()
            assert raw["usage"]["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}
            assert raw["usage"]["output_tokens_details"] == {"reasoning_tokens": 0}
            parsed = Response.model_validate(raw, strict=False)
            assert parsed.id == raw["id"] and parsed.tools[0].type == "function"
        call = parsed.output[0]
        assert call.type == "function_call"
        assert json.loads(call.arguments) == {"q": "[x]"}

        stored = await http.get(f"/v1/responses/{raw['id']}")
        assert stored.status_code == 200 and stored.json() == raw
        missing = await http.get("/v1/responses/resp_nope")
        assert missing.status_code == 404 and "error" in missing.json()


async def test_tool_call_round_trip(client: openai.AsyncOpenAI) -> None:
    r1 = await client.responses.create(
        model=MODEL, input='weather? [sim:tool=lookup:{"q": "Paris"}]', tools=TOOLS, instructions="i"
    )
    [call] = r1.output
    assert call.type == "function_call" and call.name == "lookup"
    assert call.call_id.startswith("call_") and call.id and call.id.startswith("fc_")
    assert json.loads(call.arguments) == {"q": "Paris"}
    assert r1.output_text == ""

    r2 = await client.responses.create(
        model=MODEL,
        previous_response_id=r1.id,
        tools=TOOLS,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'}],
    )
    assert r2.output_text == 'Tool lookup said: {"temp": 21}'

    # The tool output did not start a new turn.
    r3 = await client.responses.create(model=MODEL, previous_response_id=r2.id, input="thanks")
    assert r3.output_text == "[turn 2] thanks"


async def test_tool_without_arguments_and_tool_loop(client: openai.AsyncOpenAI) -> None:
    r1 = await client.responses.create(model=MODEL, input="[sim:tool=clock] time?", tools=TOOLS)
    assert r1.output[0].type == "function_call" and r1.output[0].arguments == "{}"

    prev = await client.responses.create(model=MODEL, input="loop [sim:toolloop]", tools=TOOLS)
    for _ in range(3):
        [call] = prev.output
        assert call.type == "function_call" and call.name == "lookup"
        prev = await client.responses.create(
            model=MODEL,
            previous_response_id=prev.id,
            tools=TOOLS,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "again"}],
        )
    assert prev.output[0].type == "function_call"


async def test_missing_tool_output_is_rejected_like_the_real_api(client: openai.AsyncOpenAI) -> None:
    r1 = await client.responses.create(model=MODEL, input="[sim:tool=lookup] x", tools=TOOLS)
    with pytest.raises(openai.BadRequestError, match="No tool output found for function call"):
        await client.responses.create(model=MODEL, previous_response_id=r1.id, input="never mind")
    with pytest.raises(openai.BadRequestError, match="No tool call found"):
        await client.responses.create(
            model=MODEL,
            previous_response_id=r1.id,
            input=[
                {"type": "function_call_output", "call_id": r1.output[0].call_id, "output": "ok"},
                {"type": "function_call_output", "call_id": "call_unknown", "output": "?"},
            ],
        )


async def test_status_errors_map_to_sdk_exceptions(sim: OpenAISimulator, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as rate_limited:
        await client.responses.create(model=MODEL, input="hi [sim:error=429]")
    assert rate_limited.value.response.headers["retry-after"] == "1"
    assert rate_limited.value.code == "rate_limit_exceeded"

    with pytest.raises(openai.InternalServerError) as server_error:
        await client.responses.create(model=MODEL, input="hi [sim:error=500]")
    assert server_error.value.status_code == 500
    assert server_error.value.request_id and server_error.value.request_id.startswith("req_")

    with pytest.raises(openai.APIStatusError) as unavailable:
        await client.responses.create(model=MODEL, input="hi [sim:error=503]")
    assert unavailable.value.status_code == 503

    statuses = [(c["status"], c["outcome"]) for c in sim.calls()]
    assert statuses == [(429, "error"), (500, "error"), (503, "error")]


async def test_reset_surfaces_as_connection_error(sim: OpenAISimulator, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.APIConnectionError) as dropped:
        await client.responses.create(model=MODEL, input="hi [sim:reset]")
    assert not isinstance(dropped.value, openai.APITimeoutError)
    assert isinstance(dropped.value.__cause__, httpx2.RemoteProtocolError)
    [call] = sim.calls()
    assert call["outcome"] == "reset" and call["status"] is None


async def test_delay_beyond_client_timeout_is_a_timeout(sim: OpenAISimulator, client: openai.AsyncOpenAI) -> None:
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        await client.responses.create(model=MODEL, input="slow [sim:delay=2]", timeout=0.3)
    assert time.monotonic() - started < 1.5
    # The call the client gave up on is logged, still pending; clear_calls() forgets it for good.
    [call] = sim.calls()
    assert (call["outcome"], call["status"], call["text"]) == ("pending", None, "slow [sim:delay=2]")
    with pytest.raises(TimeoutError, match="pending"):
        sim.wait_for_calls(1, timeout=0.05, answered=True)


async def test_delay_within_timeout_answers(client: openai.AsyncOpenAI) -> None:
    started = time.monotonic()
    r = await client.responses.create(model=MODEL, input="  a [sim:delay=0.3]  b ")
    assert time.monotonic() - started >= 0.3
    assert r.output_text == "[turn 1] a b"


async def test_flaky_fails_n_times_per_text_then_answers(url: str, sim: OpenAISimulator) -> None:
    text = unique("flaky [sim:flaky=500:1]")
    async with sdk_client(url, max_retries=1) as retrying:
        r = await retrying.responses.create(model=MODEL, input=text)
    assert r.output_text.startswith("[turn 1] flaky #")
    assert [c["status"] for c in sim.calls()] == [500, 200]
    assert all(c["text"] == text for c in sim.calls())


async def test_empty_answer(client: openai.AsyncOpenAI) -> None:
    r = await client.responses.create(model=MODEL, input="[sim:empty]")
    assert r.output[0].type == "message"
    assert r.output_text == ""


@pytest.mark.parametrize("n", [0, 1, 31, 1600, 5000])
async def test_long_answer_has_exact_length(client: openai.AsyncOpenAI, n: int) -> None:
    r = await client.responses.create(model=MODEL, input=f"tell me everything [sim:long={n}]")
    assert len(r.output_text) == n
    prefix = "Sentence 1 of the long answer. Sentence 2 of the long answer."
    assert prefix.startswith(r.output_text) or r.output_text.startswith(prefix)


async def test_max_output_tokens_cuts_the_answer_as_the_api_does(client: openai.AsyncOpenAI) -> None:
    r = await client.responses.create(
        model=MODEL, input="tell me everything [sim:long=5000]", max_output_tokens=40, truncation="auto"
    )
    assert r.status == "incomplete"
    assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text.startswith("Sentence 1 of the long answer.")
    assert len(r.output_text.split()) == 40
    assert r.usage is not None and r.usage.output_tokens == 40
    assert (r.max_output_tokens, r.truncation) == (40, "auto")
    # Under the cap nothing changes.
    whole = await client.responses.create(model=MODEL, input="[sim:long=100]", max_output_tokens=1024)
    assert (whole.status, whole.incomplete_details, len(whole.output_text)) == ("completed", None, 100)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_output_tokens": 15}, "max_output_tokens"),
        ({"max_output_tokens": "many"}, "max_output_tokens"),
        ({"truncation": "sometimes"}, "truncation"),
    ],
)
async def test_invalid_spend_bounds_are_refused(
    client: openai.AsyncOpenAI, extra: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        await client.responses.create(model=MODEL, input="hi", extra_body=extra)
    assert bad.value.param == param


async def test_unknown_previous_response_id(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        await client.responses.create(model=MODEL, input="hi", previous_response_id="resp_missing")
    assert bad.value.code == "previous_response_not_found"
    assert bad.value.param == "previous_response_id"
    assert bad.value.body["message"] == "Previous response with id 'resp_missing' not found."


async def test_store_false_is_not_kept(client: openai.AsyncOpenAI) -> None:
    r = await client.responses.create(model=MODEL, input="ephemeral", store=False)
    with pytest.raises(openai.BadRequestError):
        await client.responses.create(model=MODEL, input="next", previous_response_id=r.id)


async def test_history_resent_in_input_counts_turns(client: openai.AsyncOpenAI) -> None:
    r = await client.responses.create(
        model=MODEL,
        store=False,
        input=[
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "[turn 1] one"}]},
            {"role": "user", "content": "two"},
            {"role": "user", "content": "three"},
        ],
    )
    # Consecutive user items are one turn: several WhatsApp messages answered together.
    assert r.output_text == "[turn 2] two\nthree"


async def test_malformed_requests_are_400(client: openai.AsyncOpenAI, url: str) -> None:
    with pytest.raises(openai.BadRequestError):
        await client.responses.create(model=MODEL, input=42)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="unknown simulator directive"):
        await client.responses.create(model=MODEL, input="[sim:explode]")
    async with httpx2.AsyncClient(base_url=url, headers={"Authorization": "Bearer x"}, verify=CLIENT_TLS) as http:
        json_header = {"content-type": "application/json"}
        not_json = await http.post("/v1/responses", content=b"{", headers=json_header)
        assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_request_error"
        no_model = await http.post("/v1/responses", json={"input": "hi"})
        assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"


async def test_missing_or_empty_auth_is_401(url: str, sim: OpenAISimulator) -> None:
    async with httpx2.AsyncClient(base_url=url, verify=CLIENT_TLS) as http:
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Basic eDp5"}):
            reply = await http.post("/v1/responses", json={"model": MODEL, "input": "hi"}, headers=headers)
            assert reply.status_code == 401
            assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert [c["status"] for c in sim.calls()] == [401, 401, 401]


async def test_call_log_and_wait_for_calls(sim: OpenAISimulator, client: openai.AsyncOpenAI, url: str) -> None:
    # answered=True: a call is logged on arrival and completed in place, so wait for the answers.
    waiter = asyncio.create_task(asyncio.to_thread(sim.wait_for_calls, 2, 5.0, answered=True))
    await client.responses.create(model=MODEL, input="log me", instructions="sys", tools=TOOLS)
    await client.responses.create(model=MODEL, input=[{"role": "user", "content": "and me"}])
    calls = await waiter
    assert sim.wait_for_calls(2, timeout=1.0) == calls
    assert [c["text"] for c in calls] == ["log me", "and me"]
    first = calls[0]
    assert first["id"].startswith("resp_") and first["status"] == 200 and first["outcome"] == "ok"
    assert (first["instructions"], first["model"], first["tools"]) == ("sys", MODEL, ["lookup"])
    assert first["input"] == "log me" and first["previous_response_id"] is None
    assert calls[1]["input"] == [{"role": "user", "content": "and me"}]

    with pytest.raises(TimeoutError, match="expected 3 OpenAI calls"):
        sim.wait_for_calls(3, timeout=0.05)

    async with httpx2.AsyncClient(base_url=url, verify=CLIENT_TLS) as http:
        assert [c["text"] for c in (await http.get("/_sim/calls")).json()] == ["log me", "and me"]
        assert (await http.delete("/_sim/calls")).status_code == 204
    assert sim.calls() == []


async def test_modes(sim: OpenAISimulator, client: openai.AsyncOpenAI, url: str) -> None:
    sim.set_mode("failing")
    with pytest.raises(openai.InternalServerError):
        await client.responses.create(model=MODEL, input="hi")
    # Directives win over the mode.
    r = await client.responses.create(model=MODEL, input="hi [sim:delay=0]")
    assert r.output_text == "[turn 1] hi"

    async with httpx2.AsyncClient(base_url=url, verify=CLIENT_TLS) as http:
        assert (await http.post("/_sim/mode", json={"mode": "instant"})).json() == {"mode": "instant"}
        assert (await http.get("/_sim/mode")).json() == {"mode": "instant"}
        assert (await http.post("/_sim/mode", json={"mode": "chaos"})).status_code == 400
    with pytest.raises(ValueError):
        sim.set_mode("chaos")


def test_normal_mode_distribution_is_seeded() -> None:
    def draws(seed: int) -> list[tuple[float, int | None]]:
        sim = OpenAISimulator(mode="normal", seed=seed)
        plans = []
        for _ in range(4000):
            plan = sim._plan_for_text("plain")
            plans.append((plan.latency, plan.error))
        return plans

    plans = draws(1)
    assert plans == draws(1)
    errors_500 = sum(1 for _, e in plans if e == 500) / len(plans)
    errors_429 = sum(1 for _, e in plans if e == 429) / len(plans)
    ok = [lat for lat, e in plans if e is None]
    tail = sum(1 for lat in ok if lat >= 6) / len(plans)
    assert 0.02 < errors_500 < 0.04 and 0.01 < errors_429 < 0.03 and 0.08 < tail < 0.12
    assert all(1 <= lat <= 4 or 6 <= lat <= 20 for lat in ok)

    slow = OpenAISimulator(mode="slow", seed=1)
    assert all(12 <= slow._plan_for_text("x").latency <= 25 for _ in range(100))


async def test_elon_musk_takes_the_configured_delay(client: openai.AsyncOpenAI) -> None:
    started = time.monotonic()
    r = await client.responses.create(model=MODEL, input="Who is Elon Musk?")
    assert time.monotonic() - started >= 0.2
    assert r.output_text == "[turn 1] Who is Elon Musk?"


async def test_hang_is_released_by_shutdown() -> None:
    sim = OpenAISimulator()
    with LoopbackServer(sim.app, name="hang-sim") as server:
        async with sdk_client(server.url) as c:
            with pytest.raises(openai.APITimeoutError):
                await c.responses.create(model=MODEL, input="[sim:hang]", timeout=0.2)
            pending = asyncio.create_task(c.responses.create(model=MODEL, input="[sim:hang] again"))
            calls = await asyncio.to_thread(sim.wait_for_calls, 2, 5.0)
            assert [c["outcome"] for c in calls] == ["hang", "hang"]
            assert not pending.done()
            sim.shutdown()
            with pytest.raises(openai.InternalServerError):
                await asyncio.wait_for(pending, 5.0)


def test_parse_directives() -> None:
    d = parse_directives('a [SIM:delay=1.5] b [sim:tool=f:{"x": [1, "]"]}] c')
    assert d.delay == 1.5 and d.tool == ("f", {"x": [1, "]"]}) and d.clean_text == "a b c"
    assert parse_directives("x [sim:flaky=429:3]").flaky == (429, 3)
    for bad in ("[sim:error=abc]", "[sim:flaky=500]", "[sim:tool=f:[1]]", "[sim:long=x]", "[sim:delay=1"):
        with pytest.raises(ValueError):
            parse_directives(bad)


# ---------------------------------------------------------------------------------------------------- the demo model


@pytest.fixture(scope="module")
def assistant_url() -> Iterator[str]:
    """A simulator answering by intent, as the demo runs it (no echo)."""
    sim = OpenAISimulator(seed=7)
    server = LoopbackServer(sim.app, name="openai-sim-assistant")
    url = server.start()
    assistant_sims[url] = sim
    yield url
    sim.shutdown()
    server.stop()


assistant_sims: dict[str, OpenAISimulator] = {}


@pytest.fixture
async def demo_model(assistant_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with sdk_client(assistant_url, timeout=5.0) as c:
        yield c


async def run_tools(client: openai.AsyncOpenAI, response: Response, outputs: dict[str, str] | None = None) -> Response:
    """Answer every function call of `response` with the bot's real tool (or the output given), as the bot does."""
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls, response.output
    items = []
    for call in calls:
        tool = registry.get(call.name)
        assert tool is not None, call.name
        output = (outputs or {}).get(call.name) or json.dumps(await tool.func(**json.loads(call.arguments)))
        items.append({"type": "function_call_output", "call_id": call.call_id, "output": output})
    return await client.responses.create(
        model=MODEL, previous_response_id=response.id, input=items, tools=registry.specs()
    )


async def test_a_greeting_lists_the_bots_tools_and_says_it_is_the_demo_model(demo_model: openai.AsyncOpenAI) -> None:
    r = await demo_model.responses.create(model=MODEL, input="Hi! What can you do for me?", tools=registry.specs())
    text = r.output_text
    assert "demo model" in text
    assert "calculate exactly" in text and "17% of 2,340" in text
    assert "time in any time zone" in text
    assert "holding reply" in text and "remember our conversation" in text
    # Without tools in the request, no tool is promised.
    bare = await demo_model.responses.create(model=MODEL, input="hello")
    assert "demo model" in bare.output_text and "calculate" not in bare.output_text


@pytest.mark.parametrize(
    ("question", "expression", "answer"),
    [
        ("What's 17% of 2,340?", "17*2340/100", "17% of 2,340 is 397.8."),
        ("what is 6*7", "6*7", "6*7 is 42."),
        ("12 + 30", "12+30", "12 + 30 is 42."),
        ("How much is 1,250,000 / 4?", "1250000/4", "1,250,000 / 4 is 312,500."),
        ("what's 3 times 4 please", "3*4", "3 times 4 is 12."),
    ],
)
async def test_sums_go_through_the_calculate_tool(
    demo_model: openai.AsyncOpenAI, question: str, expression: str, answer: str
) -> None:
    r1 = await demo_model.responses.create(model=MODEL, input=question, tools=registry.specs())
    [call] = r1.output
    assert call.type == "function_call" and call.name == "calculate" and call.status == "completed"
    assert json.loads(call.arguments) == {"expression": expression}
    assert r1.output_text == ""
    r2 = await run_tools(demo_model, r1)
    assert r2.output_text == answer


async def test_the_answer_quotes_the_tools_result_and_does_not_compute_its_own(demo_model: openai.AsyncOpenAI) -> None:
    r1 = await demo_model.responses.create(model=MODEL, input="What's 17% of 2,340?", tools=registry.specs())
    wrong = await run_tools(demo_model, r1, {"calculate": json.dumps({"expression": "17*2340/100", "result": 1.5})})
    assert wrong.output_text == "17% of 2,340 is 1.5."
    r1 = await demo_model.responses.create(model=MODEL, input="what is 1/0", tools=registry.specs())
    # What the bot sends back when the tool raises ToolError.
    failed = await run_tools(demo_model, r1, {"calculate": json.dumps({"error": "cannot evaluate: ZeroDivisionError"})})
    assert (
        failed.output_text == "Sorry, the calculate tool could not help with that: cannot evaluate: ZeroDivisionError."
    )


async def test_a_question_about_the_time_goes_through_the_clock_tool(demo_model: openai.AsyncOpenAI) -> None:
    r1 = await demo_model.responses.create(model=MODEL, input="What time is it in Tokyo?", tools=registry.specs())
    [call] = r1.output
    assert call.type == "function_call" and call.name == "get_current_time"
    assert json.loads(call.arguments) == {"timezone": "Asia/Tokyo"}
    clock = {"timezone": "Asia/Tokyo", "iso": "2026-12-05T04:31:09+09:00", "weekday": "Saturday"}
    r2 = await run_tools(demo_model, r1, {"get_current_time": json.dumps(clock)})
    assert r2.output_text == "It's 04:31 on Saturday, 5 December 2026 (Asia/Tokyo)."
    plain = await demo_model.responses.create(model=MODEL, input="what's the time?", tools=registry.specs())
    assert json.loads(plain.output[0].arguments) == {"timezone": "UTC"}
    real = await run_tools(demo_model, plain)
    assert real.output_text.startswith("It's ") and real.output_text.endswith(" (UTC).")


async def test_anything_else_is_a_marked_simulated_answer_with_the_turn(demo_model: openai.AsyncOpenAI) -> None:
    r1 = await demo_model.responses.create(model=MODEL, input="Plan a week in Lisbon", tools=registry.specs())
    assert r1.output_text == (
        '[turn 1] (demo model) A real model would answer "Plan a week in Lisbon" here. '
        'Try "What\'s 17% of 2,340?" or "What time is it?".'
    )
    r2 = await demo_model.responses.create(
        model=MODEL, previous_response_id=r1.id, input="And the weather? [sim:delay=0]", tools=registry.specs()
    )
    assert r2.output_text == (
        '[turn 2] (demo model) A real model would answer "And the weather?" here. '
        'Your previous message was "Plan a week in Lisbon".'
    )
    # The echo on request, exactly as the tests' simulator answers every message.
    r3 = await demo_model.responses.create(
        model=MODEL, previous_response_id=r2.id, input="Hello there [sim:echo]", tools=registry.specs()
    )
    assert r3.output_text == "[turn 3] Hello there"
    # The other directives and the Elon Musk case work as before.
    assert (await demo_model.responses.create(model=MODEL, input="x [sim:long=40]")).output_text == _long(40)


def _long(n: int) -> str:
    return "Sentence 1 of the long answer. Sentence 2 of the long answer."[:n]


async def test_tools_used_names_the_tools_of_the_answers_turn(
    demo_model: openai.AsyncOpenAI, assistant_url: str
) -> None:
    sim = assistant_sims[assistant_url]
    question = f"What's 17% of 2,340? #{uuid.uuid4().hex[:6]}"
    r1 = await demo_model.responses.create(model=MODEL, input=question, tools=registry.specs())
    r2 = await run_tools(demo_model, r1)
    assert sim.tools_used(question, r2.output_text) == ["calculate"]
    # The next turn of the same conversation used no tool.
    r3 = await demo_model.responses.create(model=MODEL, previous_response_id=r2.id, input=f"thanks {question}")
    assert sim.tools_used(f"thanks {question}", r3.output_text) == []
    assert sim.tools_used("never asked", r2.output_text) == []
    # The tool directive counts too.
    r4 = await demo_model.responses.create(
        model=MODEL, input=f'{question} [sim:tool=calculate:{{"expression": "2*2"}}]', tools=registry.specs()
    )
    r5 = await run_tools(demo_model, r4)
    assert r5.output_text == 'Tool calculate said: {"expression": "2*2", "result": 4}'
    assert sim.tools_used(question, r5.output_text) == ["calculate"]


# ---------------------------------------------------------------- media: transcriptions, images and files


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


async def test_a_voice_note_is_heard_as_the_transcript_it_carries(
    sim: OpenAISimulator, client: openai.AsyncOpenAI
) -> None:
    note = voice_note("Can you book a table for two tonight?", seconds=3.0)
    result = await client.audio.transcriptions.create(
        model="gpt-4o-mini-transcribe", file=("voice.ogg", note, "audio/ogg; codecs=opus")
    )
    assert result.text == "Can you book a table for two tonight?"
    assert result.usage is not None and result.usage.type == "tokens"
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.total_tokens) == (3, 8, 11)
    [call] = sim.transcriptions()
    assert (call["model"], call["filename"], call["bytes"], call["seconds"]) == (
        "gpt-4o-mini-transcribe",
        "voice.ogg",
        len(note),
        3.0,
    )
    assert call["outcome"] == "ok" and call["status"] == 200


async def test_a_transcript_line_in_any_audio_bytes_is_heard(client: openai.AsyncOpenAI) -> None:
    fake = b"RIFF\x00\x00\x00\x00WAVE" + b"TRANSCRIPT: what time is it?\n" + bytes(100)
    result = await client.audio.transcriptions.create(model="gpt-4o-mini-transcribe", file=("note.wav", fake))
    assert result.text == "what time is it?"


async def test_without_a_transcript_the_words_grow_with_the_audios_length(client: openai.AsyncOpenAI) -> None:
    texts = {}
    for seconds in (2.0, 8.0):
        result = await client.audio.transcriptions.create(
            model="gpt-4o-mini-transcribe", file=("voice.ogg", voice_note(None, seconds=seconds))
        )
        texts[seconds] = result.text
    assert texts[2.0] == "Hi, it's me. I'm sending."
    assert texts[8.0].startswith("Hi, it's me. I'm sending you a quick voice note")
    assert len(texts[8.0].split()) == 20  # 2.5 words a second
    again = await client.audio.transcriptions.create(
        model="gpt-4o-mini-transcribe", file=("voice.ogg", voice_note(None, seconds=8.0))
    )
    assert again.text == texts[8.0]


async def test_transcription_latency_grows_with_the_audio(url: str) -> None:
    sim = OpenAISimulator(transcription_rate=0.05)
    with LoopbackServer(sim.app, name="openai-sim-rate") as server:
        async with sdk_client(server.url) as client:
            took = {}
            for seconds in (1.0, 30.0):
                started = time.monotonic()
                await client.audio.transcriptions.create(
                    model="gpt-4o-mini-transcribe", file=("voice.ogg", voice_note("hi", seconds=seconds))
                )
                took[seconds] = time.monotonic() - started
    assert took[1.0] < 1.0
    assert 1.5 <= took[30.0] < 4.0  # 30 s of audio at 0.05 s a second


async def test_timing_directives_act_on_the_transcription_and_leave_the_text(
    sim: OpenAISimulator, client: openai.AsyncOpenAI
) -> None:
    with pytest.raises(openai.InternalServerError):
        await client.audio.transcriptions.create(
            model="gpt-4o-mini-transcribe", file=("voice.ogg", voice_note("hello [sim:error=500]"))
        )
    started = time.monotonic()
    result = await client.audio.transcriptions.create(
        model="gpt-4o-mini-transcribe", file=("voice.ogg", voice_note("slow one [sim:delay=0.6] [sim:echo]"))
    )
    assert time.monotonic() - started >= 0.6
    assert result.text == "slow one [sim:echo]"  # the echo is for the model that reads the transcript
    with pytest.raises(openai.APITimeoutError):
        await client.audio.transcriptions.create(
            model="gpt-4o-mini-transcribe", file=("voice.ogg", voice_note("x [sim:delay=2]")), timeout=0.3
        )
    with pytest.raises(openai.APIConnectionError):
        await client.audio.transcriptions.create(
            model="gpt-4o-mini-transcribe", file=("voice.ogg", voice_note("x [sim:reset]"))
        )
    flaky = voice_note(unique("flaky [sim:flaky=503:1]"))
    with pytest.raises(openai.APIStatusError) as first:
        await client.audio.transcriptions.create(model="gpt-4o-mini-transcribe", file=("voice.ogg", flaky))
    assert first.value.status_code == 503
    assert (await client.audio.transcriptions.create(model="gpt-4o-mini-transcribe", file=("voice.ogg", flaky))).text
    with pytest.raises(openai.BadRequestError, match="delay between 0 and 600"):
        await client.audio.transcriptions.create(
            model="gpt-4o-mini-transcribe", file=("voice.ogg", voice_note("x [sim:delay=100000]"))
        )
    outcomes = [(c["status"], c["outcome"]) for c in sim.transcriptions()]
    assert outcomes[:2] == [(500, "error"), (200, "ok")]
    assert outcomes[-1] == (400, "error")
    assert sim.wait_for_transcriptions(len(outcomes), timeout=1.0)


async def test_files_the_endpoint_refuses(client: openai.AsyncOpenAI) -> None:
    supported = "Supported formats: ['flac', 'm4a', 'mp3', 'mp4', 'mpeg', 'mpga', 'oga', 'ogg', 'wav', 'webm']"
    with pytest.raises(openai.BadRequestError) as no_extension:
        await client.audio.transcriptions.create(model="gpt-4o-mini-transcribe", file=("voice", voice_note("hi")))
    assert no_extension.value.body == {
        "message": f"Unrecognized file format. {supported}",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(openai.BadRequestError, match=re.escape(f"Invalid file format. {supported}")):
        await client.audio.transcriptions.create(model="gpt-4o-mini-transcribe", file=("voice.ogg", b"ID3 not ogg"))
    with pytest.raises(openai.BadRequestError) as short:
        await client.audio.transcriptions.create(
            model="gpt-4o-mini-transcribe", file=("voice.ogg", voice_note("hi", seconds=0.05))
        )
    assert short.value.code == "audio_too_short"
    with pytest.raises(openai.BadRequestError) as incompatible:
        await client.audio.transcriptions.create(
            model="gpt-4o-mini-transcribe", file=("voice.ogg", voice_note("hi")), response_format="verbose_json"
        )
    assert incompatible.value.body["message"] == (  # type: ignore[index]
        "response_format 'verbose_json' is not compatible with model 'gpt-4o-mini-transcribe'. "
        "Use 'json' or 'text' instead."
    )
    with pytest.raises(openai.BadRequestError, match="ISO-639-1"):
        await client.audio.transcriptions.create(
            model="gpt-4o-mini-transcribe", file=("voice.ogg", voice_note("hi")), language="english"
        )


async def test_other_formats_and_models(client: openai.AsyncOpenAI) -> None:
    note = voice_note("hello world", seconds=2.5)
    text = await client.audio.transcriptions.create(
        model="gpt-4o-mini-transcribe", file=("voice.ogg", note), response_format="text"
    )
    assert text == "hello world\n"
    verbose = await client.audio.transcriptions.create(
        model="whisper-1",
        file=("voice.ogg", note),
        response_format="verbose_json",
        timestamp_granularities=["word"],
        language="en",
    )
    assert (verbose.text, verbose.duration, verbose.language) == ("hello world", 2.5, "english")
    assert [w.word for w in verbose.words or []] == ["hello", "world"]
    assert verbose.usage is not None and verbose.usage.seconds == 3
    plain = await client.audio.transcriptions.create(model="whisper-1", file=("voice.ogg", note))
    assert plain.usage is not None and plain.usage.type == "duration"
    srt = await client.audio.transcriptions.create(model="whisper-1", file=("voice.ogg", note), response_format="srt")
    assert srt == "1\n00:00:00,000 --> 00:00:02,500\nhello world\n\n"


async def test_a_streamed_transcription_comes_word_by_word(client: openai.AsyncOpenAI) -> None:
    stream = await client.audio.transcriptions.create(
        model="gpt-4o-mini-transcribe", file=("voice.ogg", voice_note("one two three")), stream=True
    )
    events = [event async for event in stream]
    assert [e.type for e in events] == ["transcript.text.delta"] * 3 + ["transcript.text.done"]
    assert "".join(e.delta for e in events[:3]) == "one two three"  # type: ignore[union-attr]
    assert events[-1].text == "one two three"  # type: ignore[union-attr]


async def test_the_model_says_what_image_it_saw(sim: OpenAISimulator, client: openai.AsyncOpenAI) -> None:
    photo = data_url("image/png", png(640, 480))
    r = await client.responses.create(
        model=MODEL,
        input=user({"type": "input_text", "text": "what is this?"}, {"type": "input_image", "image_url": photo}),
    )
    assert r.output_text == "[turn 1] I see a PNG image, 640×480. what is this?"
    assert r.usage is not None and r.usage.input_tokens == 3 + 85 + 170 * 2  # 2x1 tiles of 512 px
    [call] = sim.calls()
    assert call["media"] == ["I see a PNG image, 640×480."]
    sticker = data_url("image/webp", webp_header(512, 512))
    jpeg = data_url("image/jpeg", jpeg_header(1600, 1200))
    r2 = await client.responses.create(
        model=MODEL,
        previous_response_id=r.id,
        input=user(
            {"type": "input_image", "image_url": sticker, "detail": "low"},
            {"type": "input_image", "image_url": jpeg, "detail": "auto"},
        ),
    )
    assert r2.output_text == "[turn 2] I see a WebP image, 512×512. I see a JPEG image, 1600×1200."


async def test_the_model_says_what_file_it_got(client: openai.AsyncOpenAI) -> None:
    document = pdf(pages=2)
    r = await client.responses.create(
        model=MODEL,
        input=user(
            {"type": "input_file", "filename": "report.pdf", "file_data": data_url("application/pdf", document)},
            {"type": "input_text", "text": "summarise it"},
        ),
    )
    assert (
        r.output_text == f"[turn 1] I got a PDF 'report.pdf' (2 pages, {round(len(document) / 1024)} KB). summarise it"
    )


async def test_the_demo_model_describes_media_and_answers_the_caption(demo_model: openai.AsyncOpenAI) -> None:
    photo = data_url("image/png", png(32, 16))
    alone = await demo_model.responses.create(model=MODEL, input=user({"type": "input_image", "image_url": photo}))
    assert alone.output_text == "I see a PNG image, 32×16. What would you like me to do with it?"
    captioned = await demo_model.responses.create(
        model=MODEL,
        input=user(
            {"type": "input_image", "image_url": photo}, {"type": "input_text", "text": "Plan a week in Lisbon"}
        ),
    )
    assert captioned.output_text.startswith("I see a PNG image, 32×16. [turn 1] (demo model)")


@pytest.mark.parametrize(
    ("part", "message", "code"),
    [
        (
            {"type": "input_image", "image_url": "iVBORw0KGgo="},
            "Invalid 'input[0].content[0].image_url'. Expected a base64-encoded data URL with an image MIME type "
            "(e.g. 'data:image/png;base64,aW1nIGJ5dGVzIGhlcmU='), but got a value without the 'data:' prefix.",
            "invalid_value",
        ),
        (
            {"type": "input_image", "image_url": "data:image/png;base64,"},
            "Invalid 'input[0].content[0].image_url'. Expected a base64-encoded data URL with an image MIME type "
            "(e.g. 'data:image/png;base64,aW1nIGJ5dGVzIGhlcmU='), but got empty base64-encoded bytes.",
            "invalid_value",
        ),
        (
            {"type": "input_image", "image_url": "data:image/png;base64,bm90IGFuIGltYWdl"},
            "The image data you provided does not represent a valid image. Please check your input and try again "
            "with one of the supported image formats: ['image/jpeg', 'image/png', 'image/gif', 'image/webp'].",
            "invalid_image_format",
        ),
        (
            {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "ultra"},
            "Invalid value: 'ultra'. Supported values are: 'low', 'high', 'auto' and 'original'.",
            "invalid_value",
        ),
        (
            {"type": "input_file", "file_data": "data:application/pdf;base64,JVBERi0xLjQK"},
            "Missing required parameter: 'input[0].content[0].filename'.",
            "missing_required_parameter",
        ),
        (
            {"type": "input_file", "filename": "x.pdf", "file_data": "data:application/pdf;base64,bm90IGEgcGRm"},
            "Invalid 'input[0].content[0].file_data'. The file data you provided does not represent a valid PDF.",
            "invalid_file",
        ),
    ],
)
async def test_bad_media_parts_are_refused_as_the_api_does(
    client: openai.AsyncOpenAI, part: dict[str, Any], message: str, code: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(model=MODEL, input=user(part))
    assert refused.value.body["message"] == message  # type: ignore[index]
    assert refused.value.code == code


async def test_transcription_modes_and_a_hang_released_by_shutdown() -> None:
    sim = OpenAISimulator(mode="failing", transcription_rate=0.2)
    with LoopbackServer(sim.app, name="openai-sim-modes") as server:
        async with sdk_client(server.url) as client:
            with pytest.raises(openai.InternalServerError):
                await client.audio.transcriptions.create(model="whisper-1", file=("v.ogg", voice_note("hi", 1.0)))
            sim.set_mode("slow")  # five times the rate: 1 s for 1 s of audio
            started = time.monotonic()
            await client.audio.transcriptions.create(model="whisper-1", file=("v.ogg", voice_note("hi", 1.0)))
            assert time.monotonic() - started >= 1.0
            hanging = asyncio.create_task(
                client.audio.transcriptions.create(model="whisper-1", file=("v.ogg", voice_note("x [sim:hang]")))
            )
            await asyncio.to_thread(sim.wait_for_transcriptions, 3, 5.0)
            assert sim.transcriptions()[-1]["outcome"] == "hang"
            sim.shutdown()
            with pytest.raises(openai.APIStatusError) as released:
                await asyncio.wait_for(hanging, 5.0)
            assert released.value.status_code == 503


def test_audio_durations_from_the_containers() -> None:
    rate = 16_000 * 2  # 16 kHz mono 16-bit
    samples = bytes(rate * 2)  # 2 s
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16_000, rate, 2, 16)
    wav = b"RIFF" + struct.pack("<I", 4 + len(fmt) + 8 + len(samples)) + b"WAVE" + fmt
    wav += b"data" + struct.pack("<I", len(samples)) + samples
    assert inspect("note.wav", wav).seconds == 2.0 and inspect("note.wav", wav).measured
    unknown = inspect("note.mp3", b"ID3" + bytes(16_000 * 3))  # no duration read: 128 kbit/s assumed
    assert (round(unknown.seconds), unknown.measured) == (3, False)
    assert inspect("note.ogg", voice_note(None, seconds=12.34)).seconds == 12.34
    with pytest.raises(audio.UnrecognizedFormat):
        inspect("note.aac", b"whatever")
    with pytest.raises(audio.InvalidFormat):
        inspect("note.webm", b"OggS")


def test_gif_and_unsupported_file_parts(sim_server: tuple[OpenAISimulator, str]) -> None:
    gif = b"GIF89a" + struct.pack("<HH", 320, 200) + bytes(20)
    url = sim_server[1]
    body = {
        "model": MODEL,
        "input": user(
            {"type": "input_image", "image_url": data_url("image/gif", gif), "detail": "low"},
            {"type": "input_file", "filename": "notes.txt", "file_data": data_url("text/plain", b"buy bread")},
        ),
    }
    answer = httpx2.post(f"{url}/v1/responses", json=body, headers={"Authorization": "Bearer x"}, verify=CLIENT_TLS)
    assert answer.status_code == 200, answer.text
    text = answer.json()["output"][0]["content"][0]["text"]
    assert text == "[turn 1] I see a GIF image, 320×200. I got a file 'notes.txt' (text/plain, 1 KB)."
    body["input"] = user({"type": "input_file", "filename": "a.zip", "file_data": data_url("application/zip", b"PK")})
    refused = httpx2.post(f"{url}/v1/responses", json=body, headers={"Authorization": "Bearer x"}, verify=CLIENT_TLS)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "unsupported_file"
