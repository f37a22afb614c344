"""Start-up warms the OpenAI SDK in memory: the model sees no call until a user writes, and the first user is
answered through the same path as every later one."""

from __future__ import annotations

from collections.abc import Callable

from tests.conftest import Bot


def test_start_up_warms_the_sdk_without_calling_the_model(make_bot: Callable[..., Bot], sim) -> None:
    bot = make_bot()
    assert sim.calls() == []  # the warm-up's two calls never left the process
    assert bot.send("first words").messages == ["[turn 1] first words"]
    [call] = sim.calls()
    assert call["text"] == "first words"
