"""The chat page and the status view in a real browser: Playwright for Python driving Debian's Chromium.

One demo bot (simulator and sink in-process, as `wabot serve --demo` runs them) with a 1 s reply deadline and a 3 s
follow-up budget serves the tests of the timeout path, so it takes seconds; the tests that want an answer inline get
a bot with a deadline a loaded machine keeps (the page, Chromium and the bot share this process's share of the CPU).
The tests assert what a user sees: text on the page. Every wait is bounded (Playwright's expect with a timeout).

No browser is downloaded: the tests launch Debian's Chromium headless shell (`chromium-headless-shell`, which
`make test` installs; tests/binaries.py) and fail, not skip, without it. Screenshots of both pages go to a temporary
directory; with WABOT_UPDATE_SCREENSHOTS=1 they replace docs/chat.png and docs/status.png (shown in the README).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from bot.settings import DEFAULT_APOLOGY_MESSAGE, DEFAULT_HOLDING_MESSAGE
from tests.binaries import chromium
from tests.test_chat_page import DemoBot, start_demo_bot

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
pytestmark = pytest.mark.browser
WAIT_MS = 10_000  # the longest path here (holding reply, then the apology at the 3 s budget) takes ~3 s


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        # Playwright gives every launch a fresh temporary profile (user data dir) and removes it on close.
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoBot]:
    """The timing tests' bot: its simulator echoes "[turn N] <text>"."""
    bot = start_demo_bot(tmp_path_factory.mktemp("browser"), echo=True)
    yield bot
    bot.stop()


@pytest.fixture(scope="module")
def patient_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoBot]:
    """The echoing bot with a 4 s deadline: an instant answer comes inline even on a loaded machine (1 s did not
    always, with four test workers on two cores)."""
    bot = start_demo_bot(
        tmp_path_factory.mktemp("browser-patient"), echo=True, reply_timeout=4.0, followup_timeout=12.0
    )
    yield bot
    bot.stop()


@pytest.fixture(scope="module")
def assistant_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoBot]:
    """A bot as `wabot serve --demo` runs it: the simulator answers by intent and calls the bot's tools."""
    # Not a timing bot: a deadline with room for the tool's two model calls on a loaded machine.
    bot = start_demo_bot(tmp_path_factory.mktemp("browser-assistant"), reply_timeout=4.0, followup_timeout=12.0)
    yield bot
    bot.stop()


@pytest.fixture
def context(browser: Browser, demo: DemoBot) -> Iterator[BrowserContext]:
    demo.set_mode("instant")
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    yield context
    context.close()  # before the bot stops: closes the pages' event streams


def chat(context: BrowserContext, demo: DemoBot, user: str) -> Page:
    page = context.new_page()
    page.goto(f"{demo.url}/?user={quote(user)}")
    expect(page.locator("#user")).to_have_value(user)
    return page


def send(page: Page, text: str) -> None:
    page.fill("#text", text)
    page.click("#send")


def bubbles(page: Page, role: str) -> list[str]:
    return page.locator(f".msg.{role} .text").all_inner_texts()


def test_send_a_message_and_see_the_reply(context: BrowserContext, patient_demo: DemoBot) -> None:
    page = chat(context, patient_demo, "+15550002001")
    send(page, "Hello there")
    expect(page.locator(".msg.user .text")).to_have_text(["Hello there"], timeout=WAIT_MS)
    expect(page.locator(".msg.bot .text")).to_have_text(["[turn 1] Hello there"], timeout=WAIT_MS)
    # Timed by the page, from the click: a busy machine adds its own share to the bot's inline answer.
    expect(page.locator(".msg.bot .meta")).to_have_text([re.compile(r"^answered inline in \d\.\d s$")])


def test_slow_model_shows_the_holding_reply_then_the_follow_up_without_reloading(
    context: BrowserContext, demo: DemoBot
) -> None:
    page = chat(context, demo, "+15550002002")
    page.select_option("#mode", "slow")
    expect(page.locator("#mode-status")).to_have_text("model is slow (for every user)", timeout=WAIT_MS)
    page.evaluate("window.notReloaded = true")
    send(page, "Are you there?")
    bot = page.locator(".msg.bot")
    expect(bot.locator(".text")).to_have_text([DEFAULT_HOLDING_MESSAGE], timeout=WAIT_MS)
    expect(bot.locator(".meta")).to_have_text([re.compile(r"^holding reply at 1\.\d s$")])
    # The model needs 12-25 s; at the 3 s follow-up budget the user gets the apology, pushed to the open page.
    expect(bot.locator(".text")).to_have_text([DEFAULT_HOLDING_MESSAGE, DEFAULT_APOLOGY_MESSAGE], timeout=WAIT_MS)
    expect(bot.nth(1).locator(".meta")).to_have_text(re.compile(r"^holding reply at 1\.\d s → apology at 3\.\d s$"))
    assert page.evaluate("window.notReloaded") is True


def test_a_late_answer_follows_the_holding_reply_in_its_split_parts(context: BrowserContext, demo: DemoBot) -> None:
    page = chat(context, demo, "+15550002003")
    send(page, "Tell me everything [sim:delay=1.5] [sim:long=3300]")
    bot = page.locator(".msg.bot")
    expect(bot).to_have_count(4, timeout=WAIT_MS)
    expect(bot.nth(0).locator(".text")).to_have_text(DEFAULT_HOLDING_MESSAGE)
    expect(bot.nth(1).locator(".text")).to_have_text(re.compile(r"^Sentence 1 of the long answer\."))
    expect(bot.locator(".meta")).to_have_text(
        [
            re.compile(r"^holding reply at 1\.\d s$"),
            re.compile(r"^holding reply at 1\.\d s → answer at (1\.[5-9]|2\.\d) s$"),
            re.compile(r"^holding reply at 1\.\d s → answer at (1\.[5-9]|2\.\d) s · part 2$"),
            re.compile(r"^holding reply at 1\.\d s → answer at (1\.[5-9]|2\.\d) s · part 3$"),
        ]
    )


def test_typing_shows_while_the_bot_works_then_the_answer_comes_and_the_message_is_read(
    context: BrowserContext, patient_demo: DemoBot
) -> None:
    # The 4 s bot and a 2.5 s model: "typing…" shows for over 2 s. With the 1 s bot it showed only until the holding
    # reply, 0.7 s after the indicator, and a page starved by a loaded machine (a `make test` under a profiler) once
    # missed all of it. That the holding reply ends it is tests/test_chat_page.py's /demo/typing test.
    page = chat(context, patient_demo, "+15550002008")
    typing = page.locator("#typing")
    expect(typing).to_be_hidden()
    send(page, "Take your time [sim:delay=2.5]")
    # The bot's typing indicator reached the sink: WhatsApp shows "typing…" and the message as read.
    expect(typing).to_be_visible(timeout=WAIT_MS)
    expect(typing).to_have_text("typing…")
    expect(page.locator(".msg.user .meta .read")).to_have_text("✓✓", timeout=WAIT_MS)
    # The answer ends it, as any message to the user does.
    expect(page.locator(".msg.bot .text")).to_have_text(["[turn 1] Take your time"], timeout=WAIT_MS)
    expect(typing).to_be_hidden(timeout=WAIT_MS)


def test_two_users_in_two_tabs_stay_separate(context: BrowserContext, patient_demo: DemoBot) -> None:
    demo = patient_demo
    alice = chat(context, demo, "+15550002004")
    bob = chat(context, demo, "+15550002005")
    send(alice, "I am Alice")
    send(bob, "I am Bob [sim:delay=4.5]")  # past the 4 s deadline: the holding reply, then the answer
    send(alice, "Alice again")
    expect(alice.locator(".msg.bot .text")).to_have_text(
        ["[turn 1] I am Alice", "[turn 2] Alice again"], timeout=WAIT_MS
    )
    expect(bob.locator(".msg.bot .text")).to_have_text([DEFAULT_HOLDING_MESSAGE, "[turn 1] I am Bob"], timeout=WAIT_MS)
    assert bubbles(alice, "user") == ["I am Alice", "Alice again"]
    assert bubbles(bob, "user") == ["I am Bob [sim:delay=4.5]"]
    # A second tab of the same user shows that user's conversation, not the other one's.
    alice_again = chat(context, demo, "+15550002004")
    expect(alice_again.locator(".msg.user .text")).to_have_text(["I am Alice", "Alice again"], timeout=WAIT_MS)


def test_the_demo_model_greets_with_what_the_bot_can_do_and_calculates_through_the_tool(
    context: BrowserContext, assistant_demo: DemoBot
) -> None:
    assistant_demo.set_mode("instant")
    page = chat(context, assistant_demo, "+15550002007")
    send(page, "Hi! What can you do for me?")
    greeting = page.locator(".msg.bot").nth(0)
    expect(greeting.locator(".text")).to_contain_text("demo model", timeout=WAIT_MS)
    for ability in ("calculate exactly", "time in any time zone", "remember our conversation", "holding reply"):
        expect(greeting.locator(".text")).to_contain_text(ability)
    expect(greeting.locator(".meta")).to_have_text(re.compile(r"^answered inline in \d\.\d s$"))

    send(page, "What's 17% of 2,340?")
    answer = page.locator(".msg.bot").nth(1)
    expect(answer.locator(".text")).to_have_text("17% of 2,340 is 397.8.", timeout=WAIT_MS)
    expect(answer.locator(".meta")).to_have_text(re.compile(r"^answered inline in \d\.\d s · tool: calculate$"))
    expect(answer.locator(".meta .tools")).to_have_text("tool: calculate")
    expect(page.locator(".msg.bot .meta .tools")).to_have_count(1)  # the greeting used no tool
    # The number came from the bot's calculate tool: the bot ran it (its span and metric say so too).
    calls = [c for c in assistant_demo.demo.simulator.calls() if c["text"] == "What's 17% of 2,340?"]
    assert [c["input"] for c in calls][1][0]["type"] == "function_call_output"
    assert json.loads(calls[1]["input"][0]["output"]) == {"expression": "17*2340/100", "result": 397.8}


def test_status_numbers_change_after_traffic(context: BrowserContext, demo: DemoBot) -> None:
    status = context.new_page()
    status.goto(f"{demo.url}/status")
    expect(status.locator("h1")).to_have_text("wabot status")
    expect(status.locator("#deadline")).to_have_text("1 s")
    before = int(status.locator("#messages").inner_text())
    holding_before = int(status.locator("#holding").inner_text())
    page = chat(context, demo, "+15550002006")
    send(page, "count me")
    expect(page.locator(".msg.bot .text")).to_have_text(["[turn 1] count me"], timeout=WAIT_MS)
    send(page, "count me slowly [sim:delay=1.2]")
    expect(page.locator(".msg.bot .text")).to_have_count(3, timeout=WAIT_MS)
    # The status page refreshes itself every 2 s: no reload here.
    expect(status.locator("#messages")).to_have_text(str(before + 2), timeout=WAIT_MS)
    expect(status.locator("#holding")).to_have_text(str(holding_before + 1), timeout=WAIT_MS)
    expect(status.locator("#timeout-ratio-detail")).to_have_text("alert line 20.0 %")
    expect(status.locator("#histogram rect")).to_have_count(15)


def test_screenshots(context: BrowserContext, assistant_demo: DemoBot, tmp_path: Path) -> None:
    """Both pages as a user sees them after a short conversation; WABOT_UPDATE_SCREENSHOTS=1 keeps them in docs/."""
    demo = assistant_demo
    demo.set_mode("instant")
    page = chat(context, demo, "+15551234567")
    page.set_viewport_size({"width": 1100, "height": 1000})  # the whole conversation, greeting included
    send(page, "Hi! What can you do for me?")
    expect(page.locator(".msg.bot")).to_have_count(1, timeout=WAIT_MS)
    # The same question as a voice note: what was heard heads the answer, which the calculate tool worked out.
    page.set_input_files("#attach", [str(ROOT / "tests" / "fixtures" / "media" / "voice.ogg")])
    expect(page.locator("#pending .chip")).to_have_count(1)
    page.click("#send")
    expect(page.locator(".msg.user .media audio")).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator(".msg.bot .text").nth(1)).to_contain_text("17% of 2,340 is 397.8.", timeout=WAIT_MS)
    expect(page.locator(".msg.bot .text").nth(1)).to_contain_text('"What\'s 17% of 2,340?"')
    expect(page.locator(".msg.bot .meta .tools")).to_have_text(["tool: calculate"], timeout=WAIT_MS)
    send(page, "Plan a week in Lisbon for me [sim:delay=4.5]")  # past the 4 s deadline: holding reply, answer
    expect(page.locator(".msg.bot")).to_have_count(4, timeout=WAIT_MS)
    page.select_option("#mode", "failing")
    expect(page.locator("#mode-status")).to_have_text("model is failing (for every user)", timeout=WAIT_MS)
    send(page, "And the weather there?")
    expect(page.locator(".msg.bot .text").last).to_have_text(DEFAULT_APOLOGY_MESSAGE, timeout=WAIT_MS)
    page.select_option("#mode", "normal")
    expect(page.locator("#mode-status")).to_have_text("model is normal (for every user)", timeout=WAIT_MS)
    page.screenshot(path=tmp_path / "chat.png")

    status = context.new_page()
    status.goto(f"{demo.url}/status")
    expect(status.locator("#histogram")).to_be_visible()
    status.screenshot(path=tmp_path / "status.png", full_page=True)

    for name in ("chat.png", "status.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("WABOT_UPDATE_SCREENSHOTS") == "1":
            shutil.copyfile(tmp_path / name, ROOT / "docs" / name)
