"""An OpenAI-compatible Responses API server for the demo, the tests and the benchmarks.

It answers `POST /v1/responses` with bodies the real `openai` SDK parses, keeps conversations so
`previous_response_id` works, and can be told (per message, through `[sim:...]` directives in the user
text, or globally, through a mode) to be slow, fail, hang, drop the connection or call tools. Every call
is logged (its whole body under "request") so tests can assert on what the bot actually sent.

Answers are deterministic, by intent (bot/demo/assistant.py): a greeting lists what the bot can do; a sum or a
percentage asks for the `calculate` tool and a question about the time for `get_current_time`, and once the bot sends
the tool's output the answer quotes its result; anything else gets ``"[turn N] (demo model) ..."``, where N counts
the user turns of the conversation. With `echo` (the tests' simulator) or ``[sim:echo]`` in the message, every
answer is the echo ``"[turn N] <user text>"`` instead.

`max_output_tokens` is honoured (a word counts as a token): a longer answer is cut there and the Response is
`"status": "incomplete"` with `incomplete_details.reason` `"max_output_tokens"`, as the real API answers.
`truncation` is checked and echoed; the simulator has no context window to truncate.

Directives: ``[sim:delay=S]``, ``[sim:error=CODE]``, ``[sim:flaky=CODE:N]`` (the first N calls carrying this text
fail), ``[sim:retry_after=S]`` (the Retry-After header of an error answer; a 429 says 1 s unless told),
``[sim:hang]``, ``[sim:reset]``, ``[sim:tool=NAME:{json}]``, ``[sim:toolloop]``, ``[sim:long=N]``, ``[sim:empty]``,
``[sim:echo]``.

Which tools an answer used (the tool calls the simulator asked for in that user turn) is kept for the demo's chat
page: `tools_used(question, answer)`.

Images and files (bot/demo/media_parts.py): `input_image` and `input_file` parts are checked as the real API checks
them (a bad data URL, MIME type or image is a 400 with OpenAI's message) and the answer says what they showed, first:
"I see a PNG image, 640x480." / "I got a PDF 'report.pdf' (2 pages, 12 KB)." ahead of the answer to the caption
(the echo: ``"[turn N] I see ... <caption>"``); without a caption, "... What would you like me to do with it?".
The call log's "media" lists those sentences.

Transcriptions (`POST /v1/audio/transcriptions`, bot/demo/transcription.py and bot/demo/audio.py): a multipart
request checked as OpenAI's (file extension and container, model, response_format per model, language, include,
stream...). The transcript is what the audio carries (an Ogg `TRANSCRIPT=` comment, e.g. `audio.voice_note(text)`,
or a ``TRANSCRIPT: <text>`` line anywhere in the bytes), else a fixed passage as long as the audio (~2.5 words a
second). Its timing directives (delay, error, flaky, hang, reset, retry_after) act on the transcription and are
removed from the text; the others (echo, tool, long...) stay in it and reach the model with the user's words.
Latency: `transcription_rate` seconds per second of audio (default 0.1; five times that in "slow" mode; "failing"
answers 500), the audio's length read from the container (Ogg granule positions, WAV header, WebM timecodes) or
estimated from its size. Logged apart from the Responses calls: `transcriptions()`, `wait_for_transcriptions()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from bot.demo import assistant, audio, media_parts, transcription

__all__ = ["MODES", "OpenAISimulator", "parse_directives", "strip_timing_directives"]

MODES = ("instant", "normal", "slow", "failing")

# A hang is released by shutdown(); the bound only keeps a forgotten simulator from holding a task forever.
_HANG_LIMIT_S = 3600.0

_SIM_PREFIX = "[sim:"
_ELON_RE = re.compile(r"elon\s+musk", re.IGNORECASE)
_FIRST_MESSAGE_RE = re.compile(r"first message\?", re.IGNORECASE)
_LONG_SENTENCE = "Sentence {n} of the long answer."
_ANSWERS_KEPT = 1000  # answers that used tools, remembered for tools_used(): the chat page asks right after each
# Caps on what one message can ask of the simulator: anyone who can reach the demo can send directives.
_MAX_LONG_CHARS = 100_000
_MAX_DELAY_S = 600.0
_MAX_FLAKY_CALLS = 1_000


class DirectiveError(ValueError):
    """A `[sim:...]` directive that the simulator does not understand."""


@dataclass
class Directives:
    """What the `[sim:...]` directives of one user text ask for."""

    delay: float | None = None
    error: int | None = None
    flaky: tuple[int, int] | None = None
    hang: bool = False
    reset: bool = False
    tool: tuple[str, dict[str, Any]] | None = None
    toolloop: bool = False
    long: int | None = None
    empty: bool = False
    echo: bool = False
    retry_after: float | None = None
    clean_text: str = ""

    @property
    def controls_timing(self) -> bool:
        """True when a directive decides latency or failure, which overrides the mode."""
        return self.delay is not None or self.error is not None or self.flaky is not None or self.hang or self.reset


def _status_code(value: str, directive: str) -> int:
    try:
        code = int(value)
    except ValueError:
        raise DirectiveError(f"[sim:{directive}=...] needs an HTTP status code, got {value!r}") from None
    if not 400 <= code <= 599:
        raise DirectiveError(f"[sim:{directive}=...] needs a 4xx/5xx status code, got {code}")
    return code


def _scan_directive(text: str, start: int) -> int:
    """Index just past the `]` closing the directive opened at `start` (JSON arguments may nest brackets)."""
    depth = 0
    in_string = False
    escaped = False
    i = start + len(_SIM_PREFIX)
    while i < len(text):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            if depth == 0 and ch == "]":
                return i + 1
            depth -= 1
        i += 1
    raise DirectiveError(f"unterminated directive starting at {text[start : start + 40]!r}")


def _apply_directive(d: Directives, body: str) -> None:
    name, sep, value = body.partition("=")
    name = name.strip().lower()
    value = value.strip()
    if name == "delay":
        try:
            d.delay = float(value)
        except ValueError:
            raise DirectiveError(f"[sim:delay=S] needs seconds, got {value!r}") from None
        if not 0 <= d.delay <= _MAX_DELAY_S:
            raise DirectiveError(f"[sim:delay=S] needs a delay between 0 and {_MAX_DELAY_S:g} s")
    elif name == "error":
        d.error = _status_code(value, "error")
    elif name == "flaky":
        code, _, count = value.partition(":")
        try:
            n = int(count)
        except ValueError:
            raise DirectiveError(f"[sim:flaky=CODE:N] needs a count, got {value!r}") from None
        if not 0 <= n <= _MAX_FLAKY_CALLS:
            raise DirectiveError(f"[sim:flaky=CODE:N] needs a count between 0 and {_MAX_FLAKY_CALLS}")
        d.flaky = (_status_code(code, "flaky"), n)
    elif name == "hang" and not sep:
        d.hang = True
    elif name == "reset" and not sep:
        d.reset = True
    elif name == "tool":
        tool_name, _, args = value.partition(":")
        if not tool_name:
            raise DirectiveError("[sim:tool=NAME] needs a tool name")
        arguments: Any = {}
        if args:
            try:
                arguments = json.loads(args)
            except json.JSONDecodeError as exc:
                raise DirectiveError(f"[sim:tool={tool_name}:...] arguments are not JSON: {exc}") from None
            if not isinstance(arguments, dict):
                raise DirectiveError(f"[sim:tool={tool_name}:...] arguments must be a JSON object")
        d.tool = (tool_name, arguments)
    elif name == "toolloop" and not sep:
        d.toolloop = True
    elif name == "long":
        try:
            d.long = int(value)
        except ValueError:
            raise DirectiveError(f"[sim:long=N] needs a character count, got {value!r}") from None
        if not 0 <= d.long <= _MAX_LONG_CHARS:
            raise DirectiveError(f"[sim:long=N] needs a count between 0 and {_MAX_LONG_CHARS}")
    elif name == "empty" and not sep:
        d.empty = True
    elif name == "echo" and not sep:
        d.echo = True
    elif name == "retry_after":
        try:
            d.retry_after = float(value)
        except ValueError:
            raise DirectiveError(f"[sim:retry_after=S] needs seconds, got {value!r}") from None
        if not 0 <= d.retry_after <= _MAX_DELAY_S:
            raise DirectiveError(f"[sim:retry_after=S] needs seconds between 0 and {_MAX_DELAY_S:g}")
    else:
        raise DirectiveError(f"unknown simulator directive [sim:{body}]")


def parse_directives(text: str) -> Directives:
    """Parse every `[sim:...]` directive in `text`; `clean_text` is the text without them."""
    d = Directives()
    kept: list[str] = []
    pos = 0
    lowered = text.lower()
    while True:
        start = lowered.find(_SIM_PREFIX, pos)
        if start < 0:
            kept.append(text[pos:])
            break
        end = _scan_directive(text, start)
        kept.append(text[pos:start])
        _apply_directive(d, text[start + len(_SIM_PREFIX) : end - 1])
        pos = end
    # Removing a directive leaves doubled spaces behind; newlines (several messages in one turn) are kept.
    lines = (re.sub(r"[ \t]{2,}", " ", line).strip() for line in "".join(kept).split("\n"))
    d.clean_text = "\n".join(line for line in lines if line)
    return d


_TIMING_DIRECTIVES = ("delay", "error", "flaky", "hang", "reset", "retry_after")


def strip_timing_directives(text: str) -> str:
    """`text` without its timing directives (delay, error, flaky, hang, reset, retry_after); others are kept.

    A transcript's timing directives are for the transcription call; the rest (echo, tool, long...) reach the model
    with the transcript, as the user's words.
    """
    kept: list[str] = []
    pos = 0
    lowered = text.lower()
    while (start := lowered.find(_SIM_PREFIX, pos)) >= 0:
        end = _scan_directive(text, start)
        name = text[start + len(_SIM_PREFIX) : end - 1].partition("=")[0].strip().lower()
        kept.append(text[pos:start] if name in _TIMING_DIRECTIVES else text[pos:end])
        pos = end
    kept.append(text[pos:])
    return re.sub(r"[ \t]{2,}", " ", "".join(kept)).strip()


def _long_text(n: int) -> str:
    parts: list[str] = []
    length = -1
    i = 0
    while length < n:
        i += 1
        sentence = _LONG_SENTENCE.format(n=i)
        parts.append(sentence)
        length += len(sentence) + 1
    return " ".join(parts)[:n]


def _words(*texts: str) -> int:
    return max(1, sum(len(t.split()) for t in texts))


def _hex_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


class _RequestError(Exception):
    """A request the real API would refuse with 400."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass
class _ParsedInput:
    """The parts of a `input` field the simulator cares about."""

    turns: list[str] = field(default_factory=list)  # user turns carried in this input (history resend + new)
    outputs: list[tuple[str, str]] = field(default_factory=list)  # (call_id, output) after the last user turn
    answered: set[str] = field(default_factory=set)  # call_ids of every function_call_output in the input
    call_ids: dict[str, str] = field(default_factory=dict)  # call_id -> name of function_call items in the input
    all_text: list[str] = field(default_factory=list)  # everything countable as input tokens
    turn_media: list[list[str]] = field(default_factory=list)  # per turn: what its image and file parts showed
    media_tokens: int = 0  # what the image and file parts add to the input tokens


def _content_text(content: Any, where: str, seen: list[media_parts.Seen] | None = None) -> str:
    """The text of a message's content; its image and file parts are checked and, given `seen`, described there."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _RequestError(f"Invalid value for '{where}.content[{j}]'.", param=f"{where}.content")
            if part["type"] in ("input_text", "output_text", "text"):
                text = part.get("text")
                if not isinstance(text, str):
                    raise _RequestError(
                        f"Missing required parameter: '{where}.content[{j}].text'.",
                        param=f"{where}.content[{j}].text",
                        code="missing_required_parameter",
                    )
                texts.append(text)
            elif part["type"] in ("input_image", "input_file"):
                try:
                    described = media_parts.describe(part, f"{where}.content[{j}]")
                except media_parts.PartError as exc:
                    raise _RequestError(exc.message, param=exc.param, code=exc.code) from None
                if seen is not None:
                    seen.append(described)
        return "\n".join(texts)
    raise _RequestError(f"Invalid type for '{where}.content': expected a string or an array.", param=where)


def _parse_input(raw: Any) -> _ParsedInput:
    parsed = _ParsedInput()
    if isinstance(raw, str):
        parsed.turns.append(raw)
        parsed.turn_media.append([])
        parsed.all_text.append(raw)
        return parsed
    if not isinstance(raw, list):
        raise _RequestError("Invalid type for 'input': expected a string or an array.", param="input")
    pending_user: list[str] = []
    pending_media: list[media_parts.Seen] = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _RequestError(f"Invalid type for '{where}': expected an object.", param=where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise _RequestError(f"Invalid value for '{where}.role': {role!r}.", param=f"{where}.role")
            seen: list[media_parts.Seen] = []
            text = _content_text(item.get("content"), where, seen)
            parsed.all_text.append(text)
            parsed.media_tokens += sum(s.tokens for s in seen)
            if role == "user":
                pending_media += seen
                if not pending_user:
                    # A new user turn starts: tool outputs seen so far belonged to an earlier turn.
                    parsed.outputs.clear()
                pending_user.append(text)
                continue
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not call_id:
                raise _RequestError(
                    f"Missing required parameter: '{where}.call_id'.",
                    param=f"{where}.call_id",
                    code="missing_required_parameter",
                )
            if not isinstance(output, str):
                output = _content_text(output, where) if isinstance(output, list) else None
            if output is None:
                raise _RequestError(
                    f"Missing required parameter: '{where}.output'.",
                    param=f"{where}.output",
                    code="missing_required_parameter",
                )
            parsed.outputs.append((call_id, output))
            parsed.answered.add(call_id)
            parsed.all_text.append(output)
        elif kind == "function_call":
            if isinstance(item.get("call_id"), str):
                parsed.call_ids[item["call_id"]] = str(item.get("name", ""))
        elif not isinstance(kind, str):
            raise _RequestError(f"Missing required parameter: '{where}.type'.", param=f"{where}.type")
        # Consecutive user items form one turn (several WhatsApp messages answered together).
        if pending_user:
            parsed.turns.append("\n".join(pending_user))
            parsed.turn_media.append([s.description for s in pending_media])
            pending_user, pending_media = [], []
    if pending_user:
        parsed.turns.append("\n".join(pending_user))
        parsed.turn_media.append([s.description for s in pending_media])
    return parsed


@dataclass
class _Stored:
    body: dict[str, Any]
    conversation: list[str]  # raw user texts of every turn, oldest first
    pending_calls: dict[str, str]  # call_id -> tool name of function calls awaiting output
    turn_tools: list[str] = field(default_factory=list)  # tools called so far in this user turn, in order


@dataclass(frozen=True)
class _Answered:
    """A text answer and the tools called in its user turn (for the chat page's small print)."""

    text: str  # the user turn it answers, directives included
    answer: str
    tools: tuple[str, ...]


class _DroppedConnection(Response):
    """Starts a response, then returns without the promised body: uvicorn closes the socket mid-response.

    ASGI gives no way to close a connection before the status line; a truncated body is the closest thing,
    and HTTP clients report it as a connection error (openai: APIConnectionError). uvicorn logs it at ERROR
    ("ASGI callable returned without completing response."), which is expected for this fault.
    """

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
            }
        )


_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", None),
    409: ("invalid_request_error", None),
    422: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
}
_ERROR_MESSAGES = {
    429: "Rate limit reached for requests (simulated). Please try again in 1s.",
    500: "The server had an error while processing your request. Sorry about that! (simulated)",
    502: "Bad gateway. (simulated)",
    503: "The engine is currently overloaded, please try again later. (simulated)",
}


def _error_response(
    status: int,
    message: str | None = None,
    *,
    type_: str | None = None,
    param: str | None = None,
    code: str | None = None,
    retry_after: float | None = None,
) -> JSONResponse:
    default_type, default_code = _ERROR_TYPES.get(status, ("server_error", None))
    headers = {"x-request-id": _hex_id("req_")}
    if retry_after is None and status == 429:
        retry_after = 1
    if retry_after is not None:
        headers["retry-after"] = f"{retry_after:g}"
    body = {
        "error": {
            "message": message or _ERROR_MESSAGES.get(status, f"Simulated error {status}."),
            "type": type_ or default_type,
            "param": param,
            "code": code if code is not None else default_code,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


class OpenAISimulator:
    """A fake OpenAI Responses API: serve `app` (e.g. with LoopbackServer), point the SDK at ``url + "/v1"``.

    `strict_tool_outputs` mirrors the real API: continuing from a response that called tools without sending a
    `function_call_output` for every call is a 400 ("No tool output found for function call ...").
    """

    def __init__(
        self,
        *,
        mode: str = "instant",
        seed: int | None = None,
        elon_musk_delay: float = 23.0,
        strict_tool_outputs: bool = True,
        echo: bool = False,
        transcription_rate: float = 0.1,
    ) -> None:
        self._check_mode(mode)
        self._lock = threading.Lock()
        self._calls_changed = threading.Condition(self._lock)
        self._mode = mode
        self._rng = random.Random(seed)
        self._elon_musk_delay = elon_musk_delay
        self._strict_tool_outputs = strict_tool_outputs
        self._echo = echo
        self._answered: deque[_Answered] = deque(maxlen=_ANSWERS_KEPT)
        self._responses: dict[str, _Stored] = {}
        self._calls: list[dict[str, Any]] = []
        self._transcription_rate = transcription_rate
        self._transcriptions: list[dict[str, Any]] = []
        self._flaky_counts: dict[str, int] = {}
        self._shut_down = False
        self._hang_waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._app = self._build_app()

    # ---------------------------------------------------------------- public Python API

    @property
    def app(self) -> FastAPI:
        return self._app

    @property
    def mode(self) -> str:
        with self._lock:
            return self._mode

    def set_mode(self, mode: str) -> None:
        """Switch the global behaviour: instant, normal, slow or failing."""
        self._check_mode(mode)
        with self._lock:
            self._mode = mode

    def calls(self) -> list[dict[str, Any]]:
        """A copy of the call log, oldest first."""
        with self._lock:
            return copy.deepcopy(self._calls)

    def clear_calls(self) -> None:
        """Forget every logged call: the Responses calls and the transcriptions."""
        with self._lock:
            self._calls.clear()
            self._transcriptions.clear()

    def wait_for_calls(self, n: int, timeout: float, *, answered: bool = False) -> list[dict[str, Any]]:
        """Block until at least `n` calls are logged (`answered`: and none of the first `n` is pending).

        A valid call is logged as soon as it is read, with ``outcome="pending"`` and ``status=None`` while its
        simulated latency runs, and completed in place when answered; so clear_calls() also forgets calls
        still in flight, and a call the client gave up on still shows. Raises TimeoutError after `timeout`.
        """

        def ready() -> bool:
            if len(self._calls) < n:
                return False
            return not answered or all(c["outcome"] != "pending" for c in self._calls[:n])

        with self._calls_changed:
            if not self._calls_changed.wait_for(ready, timeout):
                seen = [(c["text"], c["outcome"]) for c in self._calls]
                raise TimeoutError(f"expected {n} OpenAI calls within {timeout}s, got {len(seen)}: {seen!r}")
            return copy.deepcopy(self._calls)

    def transcriptions(self) -> list[dict[str, Any]]:
        """A copy of the transcription call log, oldest first (form fields, file name and size; no audio bytes)."""
        with self._lock:
            return copy.deepcopy(self._transcriptions)

    def clear_transcriptions(self) -> None:
        with self._lock:
            self._transcriptions.clear()

    def wait_for_transcriptions(self, n: int, timeout: float, *, answered: bool = False) -> list[dict[str, Any]]:
        """Block until at least `n` transcription calls are logged (`answered`: none of the first `n` pending)."""

        def ready() -> bool:
            if len(self._transcriptions) < n:
                return False
            return not answered or all(c["outcome"] != "pending" for c in self._transcriptions[:n])

        with self._calls_changed:
            if not self._calls_changed.wait_for(ready, timeout):
                seen = [(c["text"], c["outcome"]) for c in self._transcriptions]
                raise TimeoutError(f"expected {n} transcription calls within {timeout}s, got {len(seen)}: {seen!r}")
            return copy.deepcopy(self._transcriptions)

    def response(self, response_id: str) -> dict[str, Any] | None:
        """A stored response body, or None."""
        with self._lock:
            stored = self._responses.get(response_id)
            return copy.deepcopy(stored.body) if stored else None

    def tools_used(self, question: str, answer: str) -> list[str]:
        """The tools called for the newest answer starting with `answer` to a user turn containing `question`.

        Answers are deterministic by text, so two users asking the same question at once got the same tool calls:
        which of their answers is found does not change the result. [] when there is no such answer.
        """
        answer = answer.strip()
        with self._lock:
            for answered in reversed(self._answered):
                if question in answered.text and answered.answer.startswith(answer):
                    return list(answered.tools)
        return []

    def shutdown(self) -> None:
        """Release every hanging call (they answer 503) and make later hangs return at once."""
        with self._lock:
            self._shut_down = True
            waiters = list(self._hang_waiters)
        for loop, event in waiters:
            # RuntimeError: that loop is already closed, so nothing is left to wake.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    # ---------------------------------------------------------------- HTTP app

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="openai-simulator", docs_url=None, redoc_url=None, openapi_url=None)

        @app.post("/v1/responses")
        async def create_response(request: Request) -> Response:
            return await self._create(request)

        @app.post("/v1/audio/transcriptions")
        async def create_transcription(request: Request) -> Response:
            return await self._transcribe(request)

        @app.get("/v1/responses/{response_id}")
        async def get_response(response_id: str, request: Request) -> Response:
            if (denied := self._check_auth(request)) is not None:
                return denied
            body = self.response(response_id)
            if body is None:
                return _error_response(404, f"Response with id '{response_id}' not found.")
            return JSONResponse(body)

        @app.get("/_sim/mode")
        async def get_mode() -> dict[str, str]:
            return {"mode": self.mode}

        @app.post("/_sim/mode")
        async def post_mode(request: Request) -> Response:
            try:
                payload = await request.json()
                self.set_mode(payload["mode"])
            except (ValueError, KeyError, TypeError) as exc:
                return _error_response(400, f"Invalid mode request: {exc}. Modes: {', '.join(MODES)}.")
            return JSONResponse({"mode": self.mode})

        @app.get("/_sim/calls")
        async def get_calls() -> list[dict[str, Any]]:
            return self.calls()

        @app.get("/_sim/transcriptions")
        async def get_transcriptions() -> list[dict[str, Any]]:
            return self.transcriptions()

        @app.delete("/_sim/calls")
        async def delete_calls() -> Response:
            self.clear_calls()
            return Response(status_code=204)

        return app

    @staticmethod
    def _check_mode(mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown simulator mode {mode!r}; expected one of {MODES}")

    @staticmethod
    def _check_auth(request: Request) -> Response | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _error_response(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="",
            )
        return None

    def _log(self, entry: dict[str, Any], *, append: bool, **updates: Any) -> None:
        """Append `entry` to the call log or (already appended) update it in place, under the lock."""
        with self._calls_changed:
            entry.update(updates)
            if append:
                self._calls.append(entry)
            self._calls_changed.notify_all()

    async def _create(self, request: Request) -> Response:
        entry: dict[str, Any] = {
            "id": None,
            "text": "",
            "input": None,
            "previous_response_id": None,
            "instructions": None,
            "model": None,
            "tools": [],
            "media": [],
            "request": None,
            "status": None,
            "outcome": "error",
            "at": time.monotonic(),
        }

        logged = False

        def finish(response: Response, outcome: str = "error", **updates: Any) -> Response:
            self._log(entry, append=not logged, status=response.status_code, outcome=outcome, **updates)
            return response

        if (denied := self._check_auth(request)) is not None:
            return finish(denied)
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return finish(_error_response(400, "We could not parse the JSON body of your request."))
        if not isinstance(payload, dict):
            return finish(_error_response(400, "The request body must be a JSON object."))
        entry.update(
            request=payload,
            input=payload.get("input"),
            previous_response_id=payload.get("previous_response_id"),
            instructions=payload.get("instructions"),
            model=payload.get("model"),
        )
        try:
            plan = self._plan(payload, entry)
        except _RequestError as exc:
            return finish(_error_response(400, exc.message, param=exc.param, code=exc.code))
        except DirectiveError as exc:
            return finish(_error_response(400, f"Simulator directive error: {exc}", param="input"))

        self._log(entry, append=True, outcome="pending")
        logged = True
        if plan.latency > 0:
            # This sleep IS the simulated model latency, not a wait for some condition.
            await asyncio.sleep(plan.latency)
        if plan.outcome == "hang":
            self._log(entry, append=False, outcome="hang")
            await self._hang()
            return _error_response(503, "The simulator is shutting down.")
        if plan.outcome == "reset":
            self._log(entry, append=False, outcome="reset")
            return _DroppedConnection()
        if plan.error is not None:
            return finish(_error_response(plan.error, retry_after=plan.retry_after))
        assert plan.body is not None
        with self._lock:
            if plan.stored is not None:
                self._responses[plan.body["id"]] = plan.stored
            if plan.answered is not None:
                self._answered.append(plan.answered)
        headers = {"x-request-id": _hex_id("req_"), "openai-processing-ms": str(int(plan.latency * 1000))}
        return finish(JSONResponse(plan.body, headers=headers), "ok", id=plan.body["id"])

    async def _transcribe(self, request: Request) -> Response:
        entry: dict[str, Any] = {
            "model": None,
            "filename": None,
            "bytes": 0,
            "seconds": None,
            "fields": {},
            "text": "",
            "status": None,
            "outcome": "error",
            "at": time.monotonic(),
        }
        logged = False

        def finish(response: Response, outcome: str = "error") -> Response:
            with self._calls_changed:
                entry.update(status=response.status_code, outcome=outcome)
                if not logged:
                    self._transcriptions.append(entry)
                self._calls_changed.notify_all()
            return response

        def refuse(exc: transcription.TranscriptionError) -> Response:
            return finish(_error_response(exc.status, exc.message, param=exc.param, code=exc.code))

        if (denied := self._check_auth(request)) is not None:
            return finish(denied)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > transcription.MAX_BYTES:
            message = f"Maximum content size limit ({transcription.MAX_BYTES}) exceeded ({length} bytes read)"
            return finish(_error_response(413, message, type_="server_error"))
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return finish(_error_response(400, "Could not parse multipart form", type_="invalid_request_error"))
        try:
            async with request.form(max_files=8, max_fields=100) as form:
                parsed = transcription.parse_form(form)
                upload = form.get("file")
                assert isinstance(upload, UploadFile)  # parse_form checked it
                parsed.data = await upload.read()
        except transcription.TranscriptionError as exc:
            return refuse(exc)
        except MultiPartException as exc:
            return finish(_error_response(400, f"Could not parse multipart form: {exc.message}"))
        entry.update(model=parsed.model, filename=parsed.filename, bytes=len(parsed.data), fields=parsed.fields)
        if len(parsed.data) > transcription.MAX_BYTES:
            message = f"Maximum content size limit ({transcription.MAX_BYTES}) exceeded ({len(parsed.data)} bytes read)"
            return finish(_error_response(413, message, type_="server_error"))
        try:
            info = audio.inspect(parsed.filename, parsed.data)
            transcription.check_audio(parsed, info)
        except audio.UnrecognizedFormat:
            return finish(_error_response(400, f"Unrecognized file format. Supported formats: {list(audio.FORMATS)}"))
        except audio.InvalidFormat:
            return finish(_error_response(400, f"Invalid file format. Supported formats: {list(audio.FORMATS)}"))
        except transcription.TranscriptionError as exc:
            return refuse(exc)
        heard = info.transcript if info.transcript is not None else transcription.default_transcript(info.seconds)
        entry.update(seconds=round(info.seconds, 3), text=heard)
        try:
            directives = parse_directives(heard)
        except DirectiveError as exc:
            return finish(_error_response(400, f"Simulator directive error: {exc}", param="file"))
        text = strip_timing_directives(heard)
        plan = self._transcription_timing(directives, heard, info.seconds)
        with self._calls_changed:
            self._transcriptions.append(entry)
            logged = True
            self._calls_changed.notify_all()
        if parsed.stream and plan.outcome is None and plan.error is None:
            events = transcription.stream_events(parsed, info, text)
            finish(Response(status_code=200), "ok")
            return StreamingResponse(self._sse(events, plan.latency), media_type="text/event-stream")
        if plan.latency > 0:
            # This sleep IS the simulated transcription latency, not a wait for some condition.
            await asyncio.sleep(plan.latency)
        if plan.outcome == "hang":
            entry["outcome"] = "hang"
            await self._hang()
            return _error_response(503, "The simulator is shutting down.")
        if plan.outcome == "reset":
            finish(Response(status_code=200), "reset")
            return _DroppedConnection()
        if plan.error is not None:
            return finish(_error_response(plan.error, retry_after=plan.retry_after))
        body, media_type = transcription.answer(parsed, info, text)
        headers = {"x-request-id": _hex_id("req_"), "openai-processing-ms": str(int(plan.latency * 1000))}
        if isinstance(body, dict):
            return finish(JSONResponse(body, headers=headers), "ok")
        return finish(Response(body, media_type=media_type, headers=headers), "ok")

    @staticmethod
    async def _sse(events: list[dict[str, Any]], latency: float) -> AsyncIterator[bytes]:
        # The latency is spread over the words: a streamed transcript arrives as it is heard.
        step = latency / len(events)
        for event in events:
            if step > 0:
                await asyncio.sleep(step)
            yield f"data: {json.dumps(event)}\n\n".encode()

    def _transcription_timing(self, directives: Directives, text: str, seconds: float) -> _Plan:
        """Latency and failure of a transcription: the transcript's directives first, then the audio's length."""
        plan = _Plan()
        if directives.controls_timing:
            self._plan_timing(plan, directives, "transcription:" + text)
            return plan
        with self._lock:
            mode = self._mode
        if mode == "failing":
            plan.error = 500
            return plan
        plan.latency = min(_MAX_DELAY_S, seconds * self._transcription_rate * (5.0 if mode == "slow" else 1.0))
        return plan

    async def _hang(self) -> None:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        waiter = (loop, event)
        with self._lock:
            if self._shut_down:
                return
            self._hang_waiters.add(waiter)
        try:
            async with asyncio.timeout(_HANG_LIMIT_S):
                await event.wait()
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._hang_waiters.discard(waiter)

    # ---------------------------------------------------------------- the "model"

    def _plan(self, payload: dict[str, Any], entry: dict[str, Any]) -> _Plan:
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise _RequestError(
                "Missing required parameter: 'model'.", param="model", code="missing_required_parameter"
            )
        if "input" not in payload:
            raise _RequestError(
                "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
            )
        if payload.get("stream"):
            raise _RequestError("The simulator does not support stream=true.", param="stream")
        instructions = payload.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise _RequestError("Invalid type for 'instructions': expected a string.", param="instructions")
        store = payload.get("store", True)
        if not isinstance(store, bool):
            raise _RequestError("Invalid type for 'store': expected a boolean.", param="store")
        max_output_tokens = payload.get("max_output_tokens")
        if max_output_tokens is not None and (
            not isinstance(max_output_tokens, int) or isinstance(max_output_tokens, bool) or max_output_tokens < 16
        ):
            raise _RequestError(
                "Invalid 'max_output_tokens': expected an integer of at least 16.",
                param="max_output_tokens",
                code="integer_below_min_value",
            )
        truncation = payload.get("truncation") or "disabled"
        if truncation not in ("auto", "disabled"):
            raise _RequestError(
                f"Invalid value for 'truncation': {truncation!r}; expected 'auto' or 'disabled'.", param="truncation"
            )
        tools = payload.get("tools") or []
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise _RequestError("Invalid type for 'tools': expected an array of objects.", param="tools")
        tool_names: list[str] = []
        offered: dict[str, str] = {}
        for i, tool in enumerate(tools):
            if tool.get("type") == "function":
                if not isinstance(tool.get("name"), str) or not tool["name"]:
                    raise _RequestError(
                        f"Missing required parameter: 'tools[{i}].name'.",
                        param=f"tools[{i}].name",
                        code="missing_required_parameter",
                    )
                tool_names.append(tool["name"])
                offered[tool["name"]] = str(tool.get("description") or "")
            elif not isinstance(tool.get("type"), str):
                raise _RequestError(f"Missing required parameter: 'tools[{i}].type'.", param=f"tools[{i}].type")
        entry["tools"] = tool_names

        previous_id = payload.get("previous_response_id")
        previous: _Stored | None = None
        if previous_id is not None:
            if not isinstance(previous_id, str):
                raise _RequestError(
                    "Invalid type for 'previous_response_id': expected a string.",
                    param="previous_response_id",
                )
            with self._lock:
                previous = self._responses.get(previous_id)
            if previous is None:
                raise _RequestError(
                    f"Previous response with id '{previous_id}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )

        parsed = _parse_input(payload["input"])
        known_calls = dict(previous.pending_calls) if previous else {}
        for call_id in parsed.answered:
            if call_id not in known_calls and call_id not in parsed.call_ids:
                raise _RequestError(
                    f"No tool call found for function call output with call_id {call_id}.", param="input"
                )
        if self._strict_tool_outputs and previous is not None:
            for call_id in previous.pending_calls:
                if call_id not in parsed.answered:
                    raise _RequestError(f"No tool output found for function call {call_id}.", param="input")

        conversation = list(previous.conversation) if previous else []
        if parsed.turns:
            conversation.extend(parsed.turns)
        elif not parsed.outputs:
            raise _RequestError("The input contains no user message and no function_call_output.", param="input")
        if not conversation:
            raise _RequestError("There is no user message to answer.", param="input")
        text = conversation[-1]  # tool outputs alone continue the turn of the previous response
        media = " ".join(parsed.turn_media[-1]) if parsed.turns else ""  # what this turn's images and files showed
        entry["text"] = text
        entry["media"] = parsed.turn_media[-1] if parsed.turns else []
        directives = parse_directives(text)
        outputs = [output for _, output in parsed.outputs]

        plan = _Plan()
        self._plan_timing(plan, directives, text)
        if plan.outcome is not None or plan.error is not None:
            return plan

        # The answer.
        output_items: list[dict[str, Any]] = []
        pending: dict[str, str] = {}
        answer: str | None = None
        if directives.empty:
            answer = ""
        elif directives.long is not None:
            answer = _long_text(directives.long)
        elif directives.toolloop and tool_names:
            output_items.append(_function_call(tool_names[0], {}))
        elif directives.tool is not None:
            name, arguments = directives.tool
            if outputs:
                answer = f"Tool {name} said: {outputs[-1]}"
            else:
                output_items.append(_function_call(name, arguments))
        elif _FIRST_MESSAGE_RE.search(text):
            answer = f"Your first message was: {parse_directives(conversation[0]).clean_text}"
        elif self._echo or directives.echo:
            answer = " ".join(t for t in (f"[turn {len(conversation)}]", media, directives.clean_text) if t)
        elif media and not directives.clean_text:
            answer = f"{media} What would you like me to do with it?"
        elif parsed.outputs:
            call_id, output = parsed.outputs[-1]
            name = known_calls.get(call_id) or parsed.call_ids.get(call_id, "")
            answer = assistant.after_tool(directives.clean_text, name, output)
        else:
            earlier = parse_directives(conversation[-2]).clean_text if len(conversation) > 1 else None
            reply = assistant.answer(directives.clean_text, len(conversation), offered, earlier)
            if isinstance(reply, assistant.ToolRequest):
                output_items.append(_function_call(reply.name, reply.arguments))
            else:
                answer = f"{media} {reply}" if media else reply
        # A new user turn starts its own list of tools; tool outputs alone continue the previous response's turn.
        turn_tools = list(previous.turn_tools) if previous is not None and not parsed.turns else []
        turn_tools += [item["name"] for item in output_items if item["type"] == "function_call"]
        # A word is a token here; past max_output_tokens the answer stops mid-way, as the real model's does.
        cut = answer is not None and max_output_tokens is not None and _words(answer) > max_output_tokens
        if answer is not None and max_output_tokens is not None and cut:
            answer = " ".join(answer.split()[:max_output_tokens])
        if answer is not None:
            output_items.append(
                {
                    "type": "message",
                    "id": _hex_id("msg_"),
                    "role": "assistant",
                    "status": "incomplete" if cut else "completed",
                    "content": [{"type": "output_text", "text": answer, "annotations": [], "logprobs": []}],
                }
            )
            output_tokens = _words(answer)
        else:
            output_tokens = _words(*(item["arguments"] for item in output_items))
            pending = {item["call_id"]: item["name"] for item in output_items}

        input_tokens = _words(*parsed.all_text) + parsed.media_tokens
        body = {
            "id": _hex_id("resp_"),
            "object": "response",
            "created_at": int(time.time()),
            "status": "incomplete" if cut else "completed",
            "background": False,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "instructions": instructions,
            "max_output_tokens": max_output_tokens,
            "model": model,
            "output": output_items,
            "parallel_tool_calls": bool(payload.get("parallel_tool_calls", True)),
            "previous_response_id": previous_id,
            "reasoning": {"effort": None, "summary": None},
            "store": store,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [_echo_tool(t) for t in tools],
            "top_p": 1.0,
            "truncation": truncation,
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + output_tokens,
            },
            "user": None,
            "metadata": {},
        }
        plan.body = body
        if store:
            plan.stored = _Stored(body=body, conversation=conversation, pending_calls=pending, turn_tools=turn_tools)
        if answer and turn_tools:  # an answer without tools needs no record: tools_used() says [] for it
            plan.answered = _Answered(text=text, answer=answer, tools=tuple(dict.fromkeys(turn_tools)))
        return plan

    def _plan_for_text(self, text: str) -> _Plan:
        """Latency and failure for one call carrying `text` (draws from the mode's random generator)."""
        plan = _Plan()
        self._plan_timing(plan, parse_directives(text), text)
        return plan

    def _plan_timing(self, plan: _Plan, directives: Directives, text: str) -> None:
        """Decide latency and failure: directives first, then the Elon Musk case, then the mode."""
        if directives.delay is not None:
            plan.latency = directives.delay
        plan.retry_after = directives.retry_after
        if directives.reset:
            plan.outcome = "reset"
            return
        if directives.hang:
            plan.outcome = "hang"
            return
        if directives.error is not None:
            plan.error = directives.error
            return
        if directives.flaky is not None:
            code, n = directives.flaky
            with self._lock:
                seen = self._flaky_counts.get(text, 0) + 1
                self._flaky_counts[text] = seen
            if seen <= n:
                plan.error = code
            return
        if directives.controls_timing:
            return
        if _ELON_RE.search(text):
            # The production incident this project exists for: a question that made the model think ~23 s.
            plan.latency = self._elon_musk_delay
            return
        with self._lock:
            mode = self._mode
            rng = self._rng
            if mode == "normal":
                roll = rng.random()
                if roll < 0.03:
                    plan.error, plan.latency = 500, rng.uniform(0.2, 1.5)
                elif roll < 0.05:
                    plan.error, plan.latency = 429, rng.uniform(0.05, 0.3)
                elif roll < 0.15:
                    plan.latency = rng.uniform(6.0, 20.0)
                else:
                    plan.latency = rng.uniform(1.0, 4.0)
            elif mode == "slow":
                plan.latency = rng.uniform(12.0, 25.0)
            elif mode == "failing":
                plan.error = 500


@dataclass
class _Plan:
    latency: float = 0.0
    outcome: str | None = None  # "hang" | "reset"
    error: int | None = None
    retry_after: float | None = None  # seconds for the Retry-After header of an error answer
    body: dict[str, Any] | None = None
    stored: _Stored | None = None
    answered: _Answered | None = None  # a text answer, for tools_used()


def _function_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": _hex_id("fc_"),
        "call_id": _hex_id("call_"),
        "name": name,
        "arguments": json.dumps(arguments),
        "status": "completed",
    }


def _echo_tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        return dict(tool)
    # The real API echoes function tools with every field filled in.
    return {
        "type": "function",
        "name": tool["name"],
        "description": tool.get("description"),
        "parameters": tool.get("parameters"),
        "strict": tool.get("strict", True),
    }
