"""Start-up warms the OpenAI SDK in memory: the model sees no call until a user writes, and the first user is
answered through the same path as every later one."""

from __future__ import annotations

from collections.abc import Callable

from bot import warmup
from tests.conftest import Bot
from tests.specs import problems, validator


def test_start_up_warms_the_sdk_without_calling_the_model(make_bot: Callable[..., Bot], sim) -> None:
    bot = make_bot()
    assert sim.calls() == []  # the warm-up's two calls never left the process
    assert bot.send("first words").messages == ["[turn 1] first words"]
    [call] = sim.calls()
    assert call["text"] == "first words"


def test_the_warm_up_answers_are_responses_as_openai_documents_them() -> None:
    """What the in-memory transport answers is parsed like a real answer only if it has a real answer's shape."""
    check = validator("openai.json", "Response")
    for output in ([warmup._TOOL_CALL], [warmup._MESSAGE]):
        assert problems(check, warmup._response(output), closed=True) == []
