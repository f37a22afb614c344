"""The demo simulator's `POST /v1/audio/transcriptions`: the request checked and the answer built as OpenAI's are.

Models: ``whisper-1`` answers every `response_format` but `diarized_json` and reports usage as duration (whole
seconds, rounded up); a model whose name contains ``diarize`` answers `json`, `text` and `diarized_json`; any
other model (``gpt-4o-mini-transcribe``, the default, ``gpt-4o-transcribe``...) answers `json` and `text`, reports
usage in tokens (one audio token a second, one output token a word) and may stream (`stream=true`: one
`transcript.text.delta` event a word, then `transcript.text.done`); ``whisper-1`` ignores `stream`, as documented.

What is "heard" (bot/demo/audio.py reads the file): the transcript the file carries (an Ogg `TRANSCRIPT=` comment
or a ``TRANSCRIPT: <text>`` line in the bytes), else the start of a fixed passage, about 2.5 words a second of
audio. The simulator (bot/demo/openai_simulator.py) applies the timing directives found in it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import FormData, UploadFile

from bot.demo.audio import AudioInfo

__all__ = ["MAX_BYTES", "TranscriptionError", "TranscriptionRequest", "answer", "default_transcript", "parse_form"]

MAX_BYTES = 26_214_400  # the endpoint's 25 MiB upload limit
_MIN_SECONDS = 0.1
_MAX_SECONDS_TOKEN_MODELS = 1500.0  # the gpt-4o transcription models' longest audio
_FORMATS = ("json", "text", "srt", "verbose_json", "vtt", "diarized_json")
_ARRAYS = ("languages", "keywords", "include", "timestamp_granularities", "known_speaker_names")
_ARRAYS_OF_FILES = ("known_speaker_references",)
_SCALARS = ("model", "language", "prompt", "response_format", "temperature", "stream", "chunking_strategy")
_LANGUAGE_RE = re.compile(r"^[a-z]{2}$")
_WORDS_PER_SECOND = 2.5
_PASSAGE_TEXT = (
    "Hi, it's me. I'm sending you a quick voice note because I can't type right now. Could you help me plan "
    "tomorrow? I have a meeting at ten, lunch with Ana at one, and I need to pick up the kids at five. "
    "Also remind me to buy bread and call the dentist. Thanks a lot, talk to you soon."
)
_PASSAGE = _PASSAGE_TEXT.split(" ")


class TranscriptionError(Exception):
    """A request the real endpoint refuses: its status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


@dataclass
class TranscriptionRequest:
    """A checked transcription request (the multipart form's fields, typed)."""

    model: str
    filename: str
    data: bytes
    language: str | None = None
    prompt: str | None = None
    response_format: str = "json"
    temperature: float = 0.0
    logprobs: bool = False
    stream: bool = False
    granularities: tuple[str, ...] = ("segment",)
    speaker_names: tuple[str, ...] = ()
    fields: dict[str, Any] = field(default_factory=dict)  # every form field but the file, for the call log

    @property
    def family(self) -> str:
        """ "whisper", "diarize" or "tokens" (the gpt-4o transcription models), which decides formats and usage."""
        if self.model.startswith("whisper"):
            return "whisper"
        return "diarize" if "diarize" in self.model else "tokens"


def _one(form: FormData, name: str) -> str | None:
    values = form.getlist(name)
    if not values:
        return None
    value = values[-1]
    if not isinstance(value, str):
        raise TranscriptionError(400, f"Invalid type for '{name}': expected a string, got a file.", param=name)
    return value


def _values(form: FormData, name: str) -> list[Any]:
    """An array field's values: the SDK sends `name[]` once per item."""
    return [*form.getlist(name + "[]"), *form.getlist(name)]


def _bool(value: str | None, name: str) -> bool:
    if value is None or value.lower() in ("false", "0", ""):
        return False
    if value.lower() in ("true", "1"):
        return True
    raise TranscriptionError(
        400, f"Invalid value for '{name}': expected a boolean, got '{value}'.", param=name, code="invalid_type"
    )


def parse_form(form: FormData) -> TranscriptionRequest:
    """Check the form as the endpoint does; raises TranscriptionError with OpenAI's status and message."""
    for key in form:
        base = key.removesuffix("[]")
        if base.startswith("chunking_strategy["):
            continue  # the SDK sends an object as chunking_strategy[type]=..., chunking_strategy[...]=...
        if base not in (*_SCALARS, *_ARRAYS, *_ARRAYS_OF_FILES, "file"):
            raise TranscriptionError(400, f"Unrecognized request argument supplied: {key}")
    upload = form.get("file")
    if upload is None:
        raise TranscriptionError(
            400, "Missing required parameter: 'file'.", param="file", code="missing_required_parameter"
        )
    if not isinstance(upload, UploadFile):
        raise TranscriptionError(400, "Invalid type for 'file': expected a file, got a string.", param="file")
    model = _one(form, "model")
    if not model:
        raise TranscriptionError(
            400, "Missing required parameter: 'model'.", param="model", code="missing_required_parameter"
        )
    fields: dict[str, Any] = {}
    for key in form:
        if key != "file":
            values = [v if isinstance(v, str) else f"<file {v.filename}>" for v in form.getlist(key)]
            fields[key] = values if key.endswith("[]") or len(values) > 1 else values[0]
    request = TranscriptionRequest(model=model, filename=upload.filename or "", data=b"", fields=fields)

    language = _one(form, "language")
    if language is not None and not _LANGUAGE_RE.match(language):
        raise TranscriptionError(
            400,
            f"Invalid language '{language}'. Language parameter must be specified in ISO-639-1 format.",
            param="language",
            code="invalid_language_format",
        )
    request.language = language
    request.prompt = _one(form, "prompt")
    request.response_format = _one(form, "response_format") or "json"
    if request.response_format not in _FORMATS:
        supported = ", ".join(f"'{f}'" for f in _FORMATS)
        raise TranscriptionError(
            400,
            f"Invalid value: '{request.response_format}'. Supported values are: {supported}.",
            param="response_format",
            code="invalid_value",
        )
    allowed = {"whisper": _FORMATS[:5], "diarize": ("json", "text", "diarized_json"), "tokens": ("json", "text")}
    if request.response_format not in allowed[request.family]:
        raise TranscriptionError(
            400,
            f"response_format '{request.response_format}' is not compatible with model '{model}'. "
            "Use 'json' or 'text' instead.",
            param="response_format",
            code="unsupported_value",
        )
    temperature = _one(form, "temperature")
    if temperature is not None:
        try:
            request.temperature = float(temperature)
        except ValueError:
            raise TranscriptionError(
                400, f"Invalid type for 'temperature': expected a number, got '{temperature}'.", param="temperature"
            ) from None
        if not 0.0 <= request.temperature <= 1.0:
            raise TranscriptionError(
                400,
                f"Invalid 'temperature': expected a number between 0 and 1, got {request.temperature:g}.",
                param="temperature",
                code="invalid_value",
            )
    include = [str(v) for v in _values(form, "include")]
    for value in include:
        if value != "logprobs":
            raise TranscriptionError(
                400, f"Invalid value for 'include': '{value}'. Supported values are: 'logprobs'.", param="include"
            )
    if include and (request.family != "tokens" or request.response_format != "json"):
        raise TranscriptionError(
            400,
            f"logprobs are only supported with response_format 'json' and the gpt-4o transcription models, "
            f"not with model '{model}' and response_format '{request.response_format}'.",
            param="include",
            code="unsupported_value",
        )
    request.logprobs = bool(include)
    # Streaming is not supported for whisper-1, "and will be ignored" (OpenAI's reference).
    request.stream = _bool(_one(form, "stream"), "stream") and request.family != "whisper"
    granularities = [str(v) for v in _values(form, "timestamp_granularities")]
    for value in granularities:
        if value not in ("word", "segment"):
            raise TranscriptionError(
                400,
                f"Invalid value for 'timestamp_granularities': '{value}'. Supported values are: 'word', 'segment'.",
                param="timestamp_granularities",
            )
    if granularities:
        request.granularities = tuple(dict.fromkeys(granularities))
    names = _values(form, "known_speaker_names")
    request.speaker_names = tuple(str(n) for n in names)
    return request


def check_audio(request: TranscriptionRequest, info: AudioInfo) -> None:
    """The checks the endpoint makes once the audio is read: too short, too long for the model."""
    if info.seconds < _MIN_SECONDS and info.measured:
        raise TranscriptionError(
            400,
            f"Audio file is too short. Minimum audio length is {_MIN_SECONDS} seconds.",
            param="file",
            code="audio_too_short",
        )
    if request.family != "whisper" and info.seconds > _MAX_SECONDS_TOKEN_MODELS:
        raise TranscriptionError(
            400,
            f"audio duration {info.seconds:g} seconds is longer than {_MAX_SECONDS_TOKEN_MODELS:g} seconds which "
            f"is the maximum for this model",
            param="file",
            code="invalid_value",
        )


def default_transcript(seconds: float) -> str:
    """What the simulator "hears" in audio that carries no transcript: a fixed passage, as long as the audio."""
    n = max(3, round(seconds * _WORDS_PER_SECOND))
    words = [_PASSAGE[i % len(_PASSAGE)] for i in range(n)]
    text = " ".join(words)
    return text if text[-1] in ".?!" else text.rstrip(",") + "."


def _usage(request: TranscriptionRequest, info: AudioInfo, text: str) -> dict[str, Any]:
    if request.family == "whisper":
        return {"type": "duration", "seconds": math.ceil(info.seconds)}
    audio_tokens = max(1, math.ceil(info.seconds))
    text_tokens = len(request.prompt.split()) if request.prompt else 0
    output = max(1, len(text.split()))
    return {
        "type": "tokens",
        "input_tokens": audio_tokens + text_tokens,
        "input_token_details": {"text_tokens": text_tokens, "audio_tokens": audio_tokens},
        "output_tokens": output,
        "total_tokens": audio_tokens + text_tokens + output,
    }


def _tokens(text: str) -> list[str]:
    """Words with their leading space, as the model's tokens come."""
    return [(" " if i else "") + word for i, word in enumerate(text.split())]


def _logprobs(text: str) -> list[dict[str, Any]]:
    return [{"token": t, "logprob": -0.01, "bytes": list(t.encode())} for t in _tokens(text)]


def _timestamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def answer(request: TranscriptionRequest, info: AudioInfo, text: str) -> tuple[Any, str]:
    """The body for `response_format` and its media type ("application/json" bodies are dicts, others str)."""
    end = round(info.seconds, 2)
    fmt = request.response_format
    if fmt == "text":
        return text + "\n", "text/plain"
    if fmt == "srt":
        return f"1\n{_timestamp(0, ',')} --> {_timestamp(end, ',')}\n{text}\n\n", "text/plain"
    if fmt == "vtt":
        return f"WEBVTT\n\n{_timestamp(0, '.')} --> {_timestamp(end, '.')}\n{text}\n\n", "text/vtt"
    usage = _usage(request, info, text)
    if fmt == "verbose_json":
        # Whisper's answer also says "task": "transcribe"; the published schema does not declare it, so it is left out.
        body: dict[str, Any] = {"language": _language_name(request.language)}
        body.update(duration=end, text=text)
        words = text.split()
        if "word" in request.granularities:
            step = end / max(1, len(words))
            body["words"] = [
                {"word": w.strip(".,?!"), "start": round(i * step, 2), "end": round((i + 1) * step, 2)}
                for i, w in enumerate(words)
            ]
        if "segment" in request.granularities:
            body["segments"] = [
                {
                    "id": 0,
                    "seek": 0,
                    "start": 0.0,
                    "end": end,
                    "text": " " + text,
                    "tokens": list(range(50364, 50364 + len(words))),
                    "temperature": request.temperature,
                    "avg_logprob": -0.2,
                    "compression_ratio": 1.2,
                    "no_speech_prob": 0.01,
                }
            ]
        body["usage"] = usage
        return body, "application/json"
    if fmt == "diarized_json":
        speaker = request.speaker_names[0] if request.speaker_names else "A"
        segment = {"type": "transcript.text.segment", "id": "seg_001", "start": 0.0, "end": end, "text": text}
        segment["speaker"] = speaker
        body = {"task": "transcribe", "duration": end, "text": f"{speaker}: {text}", "segments": [segment]}
        body["usage"] = usage
        return body, "application/json"
    body = {"text": text}
    if request.logprobs:
        body["logprobs"] = _logprobs(text)
    body["usage"] = usage
    return body, "application/json"


def stream_events(request: TranscriptionRequest, info: AudioInfo, text: str) -> list[dict[str, Any]]:
    """The server-sent events of a streamed transcription: a delta a word, then the whole text with usage."""
    events: list[dict[str, Any]] = []
    for token in _tokens(text):
        delta: dict[str, Any] = {"type": "transcript.text.delta", "delta": token}
        if request.logprobs:
            delta["logprobs"] = [{"token": token, "logprob": -0.01, "bytes": list(token.encode())}]
        events.append(delta)
    done: dict[str, Any] = {"type": "transcript.text.done", "text": text}
    if request.logprobs:
        done["logprobs"] = _logprobs(text)
    done["usage"] = _usage(request, info, text)
    events.append(done)
    return events


_LANGUAGES = {"en": "english", "es": "spanish", "pt": "portuguese", "fr": "french", "de": "german", "it": "italian"}


def _language_name(code: str | None) -> str:
    return _LANGUAGES.get(code or "en", code or "english")
