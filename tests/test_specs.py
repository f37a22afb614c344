"""Bodies checked against the vendors' own OpenAPI documents (../shared/specs): what the demo's OpenAI simulator
answers, and what the bot sends it, as a real model and the real API would see them."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from bot.demo.audio import voice_note
from bot.demo.loopback import LoopbackServer
from bot.demo.openai_simulator import OpenAISimulator
from bot.tools import registry
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, CLIENT_TLS, LogLines
from tests.media_samples import pdf, png
from tests.specs import known, problems, validator
from tests.test_chat_page import DemoBot, start_demo_bot

MODEL = "gpt-sim"
RESPONSE = validator("openai.json", "Response")
ERROR = validator("openai.json", "ErrorResponse")
CREATE = validator("openai.json", "CreateResponse")


def response_problems(body: dict[str, Any]) -> list[str]:
    return problems(RESPONSE, body, closed=True, tolerate=known("openai.json", "Response"))


def test_the_helper_finds_what_the_readme_says_plain_validation_misses() -> None:
    image = {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "auto"}
    body = {"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": "?"}, image]}]}
    assert problems(CREATE, body, closed=True) == []
    typo = {"model": "m", "input": "hi", "temprature": 1}
    assert problems(CREATE, typo) == []
    assert problems(CREATE, typo, closed=True) == ["$.temprature: unknown parameter (not declared by the schema)"]
    nested = {
        "model": "m",
        "input": [{"type": "function_call_output", "call_id": "call_1", "output": "{}", "result": 1}],
        "tools": [{**registry.specs()[0], "strictness": True}],
    }
    assert problems(CREATE, nested, closed=True) == [
        "$.input[0].result: unknown parameter (not declared by the schema)",
        "$.tools[0].strictness: unknown parameter (not declared by the schema)",
    ]
    assert problems(CREATE, {"model": "m", "input": 42})  # plain schema errors are reported too
    typing = validator("twilio.json", "messaging.v2.whatsapp.typing.indicator")
    assert problems(typing, {"channel": "whatsapp", "messageId": "12345"}) == [
        "$.messageId: '12345' does not match '^(SM|MM)[0-9a-fA-F]{32}$'"
    ]
    with pytest.raises(KeyError):
        validator("openai.json", "NoSuchSchema")


@pytest.fixture(scope="module")
def http() -> Iterator[httpx2.Client]:
    sim = OpenAISimulator(seed=7)
    with LoopbackServer(sim.app, name="openai-sim-specs") as server:
        with httpx2.Client(
            base_url=server.url, headers={"Authorization": "Bearer x"}, timeout=10.0, verify=CLIENT_TLS
        ) as client:
            yield client
        sim.shutdown()


def create(http: httpx2.Client, input_: Any, **extra: Any) -> dict[str, Any]:
    response = http.post("/v1/responses", json={"model": MODEL, "input": input_, "tools": registry.specs(), **extra})
    assert response.status_code == 200, response.text
    return response.json()


def tool_outputs(body: dict[str, Any], output: str) -> list[dict[str, str]]:
    calls = [item for item in body["output"] if item["type"] == "function_call"]
    assert calls, body["output"]
    return [{"type": "function_call_output", "call_id": call["call_id"], "output": output} for call in calls]


def test_every_kind_of_simulator_answer_is_a_valid_response(http: httpx2.Client) -> None:
    answers: dict[str, dict[str, Any]] = {}
    answers["greeting"] = create(http, "Hi! What can you do for me?")
    answers["calculate call"] = call = create(http, "What's 17% of 2,340?")
    result = '{"expression": "17*2340/100", "result": 397.8}'
    answers["calculate answer"] = create(http, tool_outputs(call, result), previous_response_id=call["id"])
    answers["clock call"] = clock = create(http, "What time is it?")
    now = '{"timezone": "UTC", "iso": "2026-12-04T19:40:00+00:00", "weekday": "Friday"}'
    answers["clock answer"] = create(http, tool_outputs(clock, now), previous_response_id=clock["id"])
    answers["simulated"] = create(http, "Plan a week in Lisbon", previous_response_id=answers["greeting"]["id"])
    answers["echo"] = create(http, [{"role": "user", "content": [{"type": "input_text", "text": "hi [sim:echo]"}]}])
    answers["tool directive"] = create(http, '[sim:tool=calculate:{"expression": "6*7"}]')
    answers["long"] = create(http, "[sim:long=2000]", instructions="be brief")
    answers["empty"] = create(http, "[sim:empty]", store=False)
    answers["cut"] = create(http, "[sim:long=2000]", max_output_tokens=16, truncation="auto")
    assert answers["calculate call"]["output"][0]["type"] == "function_call"
    assert answers["calculate answer"]["output"][0]["content"][0]["text"] == "17% of 2,340 is 397.8."
    assert answers["cut"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert (answers["cut"]["max_output_tokens"], answers["cut"]["truncation"]) == (16, "auto")
    # What the live API sends too (the README's known discrepancies), and nothing else, is tolerated.
    assert problems(RESPONSE, answers["greeting"], closed=True) == [
        "$.user: None is not of type 'string'",
        "$.store: unknown parameter (not declared by the schema)",
    ]
    for kind, body in answers.items():
        assert response_problems(body) == [], kind
        stored = http.get(f"/v1/responses/{body['id']}")
        if kind != "empty":
            assert response_problems(stored.json()) == [], kind


def test_every_error_body_is_a_valid_error_response(http: httpx2.Client) -> None:
    errors = {
        "400 directive": http.post("/v1/responses", json={"model": MODEL, "input": "[sim:explode]"}),
        "400 no model": http.post("/v1/responses", json={"input": "hi"}),
        "400 output cap": http.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 8}),
        "400 truncation": http.post("/v1/responses", json={"model": MODEL, "input": "hi", "truncation": "yes"}),
        "400 not json": http.post("/v1/responses", content=b"{", headers={"content-type": "application/json"}),
        "401": http.post("/v1/responses", json={"model": MODEL, "input": "hi"}, headers={"Authorization": ""}),
        "404": http.get("/v1/responses/resp_missing"),
        "429": http.post("/v1/responses", json={"model": MODEL, "input": "hi [sim:error=429]"}),
        "500": http.post("/v1/responses", json={"model": MODEL, "input": "hi [sim:error=500]"}),
        "503": http.post("/v1/responses", json={"model": MODEL, "input": "hi [sim:error=503]"}),
    }
    for kind, response in errors.items():
        assert str(response.status_code) == kind.split()[0], (kind, response.status_code)
        assert problems(ERROR, response.json(), closed=True) == [], kind


@pytest.fixture
def assistant_bot(tmp_path: Path, log_lines: LogLines) -> Iterator[DemoBot]:
    bot = start_demo_bot(tmp_path)
    yield bot
    bot.stop()


def test_every_request_the_bot_sends_is_a_valid_create_response_without_unknown_keys(assistant_bot: DemoBot) -> None:
    user = "+15550007001"
    for text in ("Hi! What can you do for me?", "What's 17% of 2,340?", "What time is it in Tokyo?", "thanks"):
        assistant_bot.send(user, text)
    assistant_bot.send("+15550007002", "[sim:tool=nope] call a tool the bot does not have")
    calls = assistant_bot.demo.simulator.calls()
    # A first call per message, a second for each tool round trip (the unknown tool's error goes back too).
    assert len(calls) == 8, [c["text"] for c in calls]
    kinds = {item.get("type", "message") for c in calls if isinstance(c["input"], list) for item in c["input"]}
    assert "function_call_output" in kinds
    assert any(c["previous_response_id"] for c in calls)
    for call in calls:
        assert problems(CREATE, call["request"], closed=True) == [], call["request"]
        # The spend bounds ride on every call, the tool round trips' included.
        assert call["request"]["max_output_tokens"] == assistant_bot.settings.max_output_tokens
        assert call["request"]["truncation"] == "auto"


def test_what_the_bot_sends_twilio_and_what_the_sink_answers_are_twilios_shapes(make_bot, sim, sink) -> None:
    """A follow-up's create-message form, as the twilio SDK sent it, and the message list the sink answers, against
    Twilio's own OpenAPI document (form values are strings: every field the bot sends is a string property)."""
    bot = make_bot(reply_timeout=0.5)
    assert bot.send("a slow one [sim:delay=1]").messages  # the holding reply; the answer follows by REST
    sink.wait_for_messages(1, timeout=10)
    bot.wait_idle()
    forms = [attempt["form"] for attempt in sink.attempts()]
    assert forms
    create = validator("twilio.json", "CreateMessageRequest")
    for form in forms:
        assert problems(create, form, closed=True) == [], form
    listed = httpx2.get(
        f"{bot.settings.twilio_api_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json",
        auth=(ACCOUNT_SID, AUTH_TOKEN),
        verify=CLIENT_TLS,
    )
    assert listed.status_code == 200, listed.text
    assert problems(validator("twilio.json", "ListMessageResponse"), listed.json()) == []


TRANSCRIPTION_ANSWERS = {
    "json": "CreateTranscriptionResponseJson",
    "text": None,
    "verbose_json": "CreateTranscriptionResponseVerboseJson",
    "diarized_json": "CreateTranscriptionResponseDiarizedJson",
}


def form_as_request(fields: dict[str, Any], filename: str) -> dict[str, Any]:
    """A logged multipart form as the object CreateTranscriptionRequest describes: arrays from `name[]`, types."""
    request: dict[str, Any] = {"file": filename}
    for key, value in fields.items():
        if key.endswith("[]"):
            request[key.removesuffix("[]")] = value
        elif key == "stream":
            request[key] = value == "true"
        elif key == "temperature":
            request[key] = float(value)
        else:
            request[key] = value
    return request


def test_every_transcription_answer_and_request_is_openais_shape(http: httpx2.Client) -> None:
    """Through the openai SDK: each response_format's body against its schema, the stream's events, and the forms
    the SDK sent against CreateTranscriptionRequest (closed: no field the endpoint does not know)."""
    sim_url = str(http.base_url).rstrip("/")
    note = ("voice.ogg", voice_note("Book a table for two", seconds=2.0), "audio/ogg")
    client = openai.OpenAI(
        base_url=sim_url + "/v1", api_key="x", max_retries=0, http_client=openai.DefaultHttpxClient(verify=CLIENT_TLS)
    )
    answers: dict[str, Any] = {}
    for model, fmt, extra in (
        ("gpt-4o-mini-transcribe", "json", {"language": "en", "prompt": "a booking", "temperature": 0.2}),
        ("gpt-4o-mini-transcribe", "text", {}),
        ("gpt-4o-transcribe", "json", {"include": ["logprobs"]}),
        ("whisper-1", "json", {}),
        ("whisper-1", "verbose_json", {"timestamp_granularities": ["word", "segment"]}),
        ("gpt-4o-transcribe-diarize", "diarized_json", {"chunking_strategy": "auto", "known_speaker_names": ["ana"]}),
    ):
        raw = client.audio.transcriptions.with_raw_response.create(model=model, file=note, response_format=fmt, **extra)
        assert raw.http_response.status_code == 200, raw.http_response.text
        schema = TRANSCRIPTION_ANSWERS[fmt]
        if schema is None:
            assert raw.http_response.text == "Book a table for two\n"
            continue
        body = raw.http_response.json()
        answers[f"{model} {fmt}"] = body
        assert problems(validator("openai.json", schema), body, closed=True) == [], (model, fmt, body)
    assert answers["gpt-4o-mini-transcribe json"]["usage"]["type"] == "tokens"
    assert answers["whisper-1 json"]["usage"] == {"type": "duration", "seconds": 2}
    assert len(answers["gpt-4o-transcribe json"]["logprobs"]) == 5
    assert answers["gpt-4o-transcribe-diarize diarized_json"]["segments"][0]["speaker"] == "ana"

    events = list(client.audio.transcriptions.create(model="gpt-4o-mini-transcribe", file=note, stream=True))
    stream_event = validator("openai.json", "CreateTranscriptionResponseStreamEvent")
    for event in events:
        assert problems(stream_event, event.model_dump(exclude_none=True), closed=True) == [], event
    request = validator("openai.json", "CreateTranscriptionRequest")
    logged = http.get("/_sim/transcriptions")
    assert logged.status_code == 200
    calls = logged.json()
    assert len(calls) >= 7
    for call in calls:
        assert problems(request, form_as_request(call["fields"], call["filename"]), closed=True) == [], call


def test_every_transcription_error_is_a_valid_error_response(http: httpx2.Client) -> None:
    note = voice_note("hi", seconds=1.0)

    def transcribe(files: dict[str, Any], **fields: Any) -> httpx2.Response:
        return http.post("/v1/audio/transcriptions", files=files, data={"model": "gpt-4o-mini-transcribe", **fields})

    errors = {
        "400 unrecognized format": transcribe({"file": ("voice", note)}),
        "400 invalid format": transcribe({"file": ("voice.mp3", note)}),
        "400 too short": transcribe({"file": ("voice.ogg", voice_note("hi", seconds=0.02))}),
        "400 format for model": transcribe({"file": ("voice.ogg", note)}, response_format="srt"),
        "400 unknown field": transcribe({"file": ("voice.ogg", note)}, speed="2"),
        "400 no file": http.post("/v1/audio/transcriptions", files={"model": (None, "whisper-1")}),
        "400 not multipart": http.post("/v1/audio/transcriptions", json={"model": "whisper-1"}),
        "400 directive": transcribe({"file": ("voice.ogg", voice_note("[sim:explode]"))}),
        "401": http.post("/v1/audio/transcriptions", headers={"Authorization": ""}, files={"file": ("v.ogg", note)}),
        "413": transcribe({"file": ("voice.ogg", b"OggS" + bytes(26_214_400))}),
        "429": transcribe({"file": ("voice.ogg", voice_note("hi [sim:error=429]"))}),
        "500": transcribe({"file": ("voice.ogg", voice_note("hi [sim:error=500]"))}),
    }
    for kind, response in errors.items():
        assert str(response.status_code) == kind.split()[0], (kind, response.status_code, response.text)
        assert problems(ERROR, response.json(), closed=True) == [], kind


def test_answers_to_images_and_files_are_valid_responses_and_the_requests_valid_create_responses(
    http: httpx2.Client,
) -> None:
    photo = f"data:image/png;base64,{base64.b64encode(png(64, 48)).decode()}"
    menu = pdf(pages=3)
    document = f"data:application/pdf;base64,{base64.b64encode(menu).decode()}"
    content = [
        {"type": "input_text", "text": "what are these?"},
        {"type": "input_image", "image_url": photo, "detail": "auto"},
        {"type": "input_file", "filename": "menu.pdf", "file_data": document},
    ]
    body = {"model": MODEL, "input": [{"role": "user", "content": content}]}
    assert problems(CREATE, body, closed=True) == []
    response = http.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert response_problems(answer) == []
    assert answer["output"][0]["content"][0]["text"].startswith(
        f"I see a PNG image, 64×48. I got a PDF 'menu.pdf' (3 pages, {max(1, round(len(menu) / 1024))} KB)."
    )
    bad = {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}
    refused = http.post("/v1/responses", json=bad)
    assert refused.status_code == 400
    assert problems(ERROR, refused.json(), closed=True) == []


def test_the_typing_indicator_the_bot_sends_and_the_sinks_answer_are_twilios_shapes(make_bot, sim, sink) -> None:
    """The typing indicator's form as the twilio SDK sent it for a message (CreateTypingIndicator's request body) and
    the sink's answer to it (the operation's 200 body), against Twilio's Messaging v2 document."""
    bot = make_bot(reply_timeout=2.0)
    form = bot.form("show me typing [sim:delay=0.3]")
    assert bot.post_form(form).messages
    [indicator] = sink.wait_for_typing(1, message_id=form["MessageSid"], timeout=5)
    assert (
        problems(validator("twilio.json", "messaging.v2.whatsapp.typing.indicator"), indicator["form"], closed=True)
        == []
    )
    answered = httpx2.post(
        f"{bot.settings.twilio_api_url}/v2/Indicators/Typing.json",
        data=indicator["form"],
        auth=(ACCOUNT_SID, AUTH_TOKEN),
        verify=CLIENT_TLS,
    )
    assert answered.status_code == 200, answered.text
    assert problems(validator("twilio.json", "CreateTypingIndicatorResponse"), answered.json(), closed=True) == []
    assert answered.json() == {"success": True}
