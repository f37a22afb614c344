"""The demo chat page's server side, over real HTTP: a demo bot (simulator and sink in-process, as `wabot serve
--demo` runs them) with a 1 s reply deadline, driven through /demo/send and read through the /demo/events stream.

Also the helpers tests/test_browser.py uses to start such a bot.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest

from bot.app import begin_shutdown, create_app
from bot.demo.chat import STATIC, Conversation
from bot.demo.loopback import LoopbackServer
from bot.demo.runner import Demo, start_demo
from bot.settings import DEFAULT_APOLOGY_MESSAGE, DEFAULT_HOLDING_MESSAGE, Settings
from tests.conftest import CLIENT_TLS, Bot, LogLines, free_port
from tests.waiting import wait_until

REPLY_TIMEOUT_S = 1.0
FOLLOWUP_TIMEOUT_S = 3.0
INLINE = re.compile(r"^answered inline in (\d+\.\d) s$")
HOLDING = re.compile(r"^holding reply at (\d+\.\d) s$")
FOLLOWUP = re.compile(r"^holding reply at (\d+\.\d) s → (answer|apology) at (\d+\.\d) s(?: · part (\d+))?$")


@dataclass
class DemoBot:
    """A bot serving the chat page, as `wabot serve --demo` runs it, on 127.0.0.1."""

    url: str
    settings: Settings
    demo: Demo
    server: LoopbackServer
    client: httpx2.Client = field(default_factory=lambda: httpx2.Client(timeout=30.0, verify=CLIENT_TLS))

    def send(self, user: str, text: str) -> None:
        response = self.client.post(f"{self.url}/demo/send", json={"user": user, "text": text})
        assert response.status_code == 200, response.text

    def set_mode(self, mode: str) -> None:
        response = self.client.post(f"{self.url}/demo/mode", json={"mode": mode})
        assert response.json() == {"mode": mode}, response.text

    def events(self, user: str, n: int, *, after: int = 0, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The first `n` events of `user`'s stream after event number `after`; each must come within `timeout`."""
        got: list[dict[str, Any]] = []
        headers = {"Last-Event-ID": str(after)} if after else {}
        url = f"{self.url}/demo/events"
        with httpx2.stream(
            "GET", url, params={"user": user}, headers=headers, timeout=timeout, verify=CLIENT_TLS
        ) as response:
            assert response.status_code == 200, response.read()
            try:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        got.append(json.loads(line.removeprefix("data: ")))
                        if len(got) == n:
                            return got
            except httpx2.ReadTimeout:
                raise AssertionError(f"{user}: no event for {timeout} s after {_brief(got)}") from None
        raise AssertionError(f"the stream of {user} ended after {_brief(got)}")

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Bounded poll of /readyz until no run is in flight."""
        idle = lambda: self.client.get(f"{self.url}/readyz").json().get("runs_in_flight") == 0  # noqa: E731
        wait_until(idle, timeout, "no run in flight")

    def stop(self) -> None:
        self.client.close()
        self.server.stop()
        self.demo.stop()


def _brief(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(e["id"], e["text"][:40], e["meta"], e.get("reply_to")) for e in events]


def start_demo_bot(tmp: Path, *, echo: bool = False, **overrides: Any) -> DemoBot:
    """A demo bot in this process: deadline 1 s, follow-up budget 3 s, simulator in "instant" mode.

    `echo`: the simulator answers "[turn N] <text>" (what the timing tests compare), not by intent as in the demo.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    values: dict[str, Any] = {
        "store": f"sqlite:///{tmp}/demo-{port}.db",
        "reply_timeout": REPLY_TIMEOUT_S,
        "followup_timeout": FOLLOWUP_TIMEOUT_S,
        "otel_traces_exporter": "none",
        **overrides,
    }
    base = Settings.model_construct(**{**Settings(_env_file=None).model_dump(), **values})
    settings, demo = start_demo(base, bot_url=url, mode="instant", echo=echo)
    try:
        server = LoopbackServer(create_app(settings, demo=demo), port=port, name="wabot-demo")
        server.start()
    except BaseException:
        demo.stop()
        raise
    return DemoBot(url=url, settings=settings, demo=demo, server=server)


@pytest.fixture
def demo_bot(tmp_path: Path, log_lines: LogLines) -> Iterator[DemoBot]:
    bot = start_demo_bot(tmp_path, echo=True)
    yield bot
    bot.stop()


@pytest.fixture
def assistant_bot(tmp_path: Path, log_lines: LogLines) -> Iterator[DemoBot]:
    """A demo bot whose simulator answers by intent, as `wabot serve --demo` runs it."""
    bot = start_demo_bot(tmp_path)
    yield bot
    bot.stop()


def seconds(pattern: re.Pattern[str], meta: str, group: int = 1) -> float:
    match = pattern.match(meta)
    assert match, (pattern.pattern, meta)
    return float(match.group(group))


# ---------------------------------------------------------------------------------------------------- tests


def test_without_demo_the_webhook_port_has_no_chat_page_and_no_status(bot: Bot) -> None:
    for path in ("/", "/demo/events?user=%2B15550001111", "/demo/users", "/demo/mode", "/status", "/status.json"):
        assert bot.client.get(f"{bot.url}{path}").status_code == 404, path
    assert bot.client.post(f"{bot.url}/demo/send", json={"user": "+15550001111", "text": "hi"}).status_code == 404


def test_the_page_and_its_assets_come_from_the_app_itself(demo_bot: DemoBot) -> None:
    page = demo_bot.client.get(f"{demo_bot.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<option value="instant" selected>' in page.text
    for mode in ("normal", "slow", "failing"):
        assert f'<option value="{mode}"' in page.text
    assert "reply deadline 1 s" in page.text
    # No CDN, no build step: every reference is to this server.
    references = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert references and all(ref.startswith("/") and not ref.startswith("//") for ref in references), references
    for name, content_type in (("chat.js", "text/javascript"), ("chat.css", "text/css")):
        asset = demo_bot.client.get(f"{demo_bot.url}/demo/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(content_type)
        assert asset.text == (STATIC / name).read_text(encoding="utf-8")
        assert "http://" not in asset.text and "https://" not in asset.text
    assert demo_bot.client.get(f"{demo_bot.url}/demo/static/chat.html").status_code == 404
    assert demo_bot.client.get(f"{demo_bot.url}/demo/static/..%2F..%2Fsettings.py").status_code == 404


def test_inline_answer_then_holding_reply_and_follow_up_with_their_timing(demo_bot: DemoBot) -> None:
    user = "+15550001001"
    demo_bot.send(user, "hello")
    demo_bot.send(user, "think a while [sim:delay=2]")
    events = demo_bot.events(user, 5)
    assert [(e["id"], e["role"], e["text"]) for e in events] == [
        (1, "user", "hello"),
        (2, "bot", "[turn 1] hello"),
        (3, "user", "think a while [sim:delay=2]"),
        (4, "bot", DEFAULT_HOLDING_MESSAGE),
        (5, "bot", "[turn 2] think a while"),
    ]
    assert seconds(INLINE, events[1]["meta"]) < REPLY_TIMEOUT_S
    held_at = seconds(HOLDING, events[3]["meta"])
    assert REPLY_TIMEOUT_S <= held_at < REPLY_TIMEOUT_S + 0.5
    # The follow-up repeats when the holding reply went out, then says when the answer came.
    assert seconds(FOLLOWUP, events[4]["meta"]) == held_at
    assert FOLLOWUP.match(events[4]["meta"]).group(2) == "answer"
    assert 2.0 <= seconds(FOLLOWUP, events[4]["meta"], 3) < FOLLOWUP_TIMEOUT_S
    assert [e.get("reply_to") for e in events] == [None, 1, None, 3, 3]


def test_a_split_answer_and_the_next_owed_answer_go_to_their_own_messages(demo_bot: DemoBot) -> None:
    """Two messages owed at once: the first one's three parts, then the second one's answer right after."""
    user = "+15550001002"
    demo_bot.send(user, "the long one [sim:delay=1.5] [sim:long=3300]")  # holding at 1 s, 3 parts at 1.5 s
    demo_bot.send(user, "the next one [sim:delay=1.2]")  # waits for its turn (past its own deadline): holding too
    events = demo_bot.events(user, 8)
    first, second = (e for e in events if e["role"] == "user")
    assert (first["text"], second["text"]) == (
        "the long one [sim:delay=1.5] [sim:long=3300]",
        "the next one [sim:delay=1.2]",
    )
    to_first = [e for e in events if e.get("reply_to") == first["id"]]
    to_second = [e for e in events if e.get("reply_to") == second["id"]]
    assert [len(e["text"]) for e in to_first] == [len(DEFAULT_HOLDING_MESSAGE), 1590, 1600, 107]
    assert [FOLLOWUP.match(e["meta"]).group(4) for e in to_first[1:]] == [None, "2", "3"]
    assert [e["text"] for e in to_second] == [DEFAULT_HOLDING_MESSAGE, "[turn 2] the next one"]
    assert FOLLOWUP.match(to_second[1]["meta"]).group(4) is None


def test_slow_model_gives_holding_reply_then_apology_at_the_follow_up_budget(demo_bot: DemoBot) -> None:
    user = "+15550001003"
    assert demo_bot.client.get(f"{demo_bot.url}/demo/mode").json() == {"mode": "instant"}
    assert demo_bot.client.post(f"{demo_bot.url}/demo/mode", json={"mode": "fast"}).status_code == 400
    demo_bot.set_mode("slow")  # 12-25 s per answer: past the 3 s follow-up budget
    demo_bot.send(user, "anyone there?")
    events = demo_bot.events(user, 3)
    assert [e["text"] for e in events] == ["anyone there?", DEFAULT_HOLDING_MESSAGE, DEFAULT_APOLOGY_MESSAGE]
    match = FOLLOWUP.match(events[2]["meta"])
    assert match and match.group(2) == "apology"
    assert FOLLOWUP_TIMEOUT_S <= float(match.group(3)) < FOLLOWUP_TIMEOUT_S + 1.0


def test_users_stay_separate_and_a_stream_resumes_after_the_last_event_seen(demo_bot: DemoBot) -> None:
    alice, bob = "+15550001004", "+15550001005"
    demo_bot.send(alice, "from alice")
    demo_bot.send(bob, "from bob [sim:delay=1.2]")
    demo_bot.send(alice, "alice again")
    assert [e["text"] for e in demo_bot.events(alice, 4)] == [
        "from alice",
        "[turn 1] from alice",
        "alice again",
        "[turn 2] alice again",
    ]
    assert [e["text"] for e in demo_bot.events(bob, 3)] == [
        "from bob [sim:delay=1.2]",
        DEFAULT_HOLDING_MESSAGE,
        "[turn 1] from bob",
    ]
    assert [e["id"] for e in demo_bot.events(alice, 1, after=3)] == [4]
    assert demo_bot.client.get(f"{demo_bot.url}/demo/users").json() == [alice, bob]


def test_bad_input_is_refused_and_numbers_stay_out_of_the_logs(demo_bot: DemoBot, log_lines: LogLines) -> None:
    mark = log_lines.mark()
    for body in ({"user": "15550001006", "text": "hi"}, {"user": "+15550001006", "text": ""}, {"text": "hi"}):
        assert demo_bot.client.post(f"{demo_bot.url}/demo/send", json=body).status_code == 422, body
    assert demo_bot.client.get(f"{demo_bot.url}/demo/events", params={"user": "nobody"}).status_code == 422
    demo_bot.send("+15550001006", "private [sim:delay=1.2]")
    demo_bot.events("+15550001006", 3)
    demo_bot.wait_idle()  # the run logs followup_sent after the sink accepted the message
    lines = log_lines.lines[mark:]
    assert any('"followup_sent"' in line for line in lines)
    assert not [line for line in lines if "5550001006" in line]


def test_a_stop_signal_ends_open_event_streams(demo_bot: DemoBot) -> None:
    """begin_shutdown (called from the SIGTERM handler by bot/server.py) ends the streams, so uvicorn's graceful
    shutdown does not wait for open chat tabs."""
    opened, ended = threading.Event(), threading.Event()

    def read() -> None:
        with httpx2.stream(
            "GET", f"{demo_bot.url}/demo/events", params={"user": "+15550001007"}, verify=CLIENT_TLS
        ) as response:
            for _ in response.iter_lines():
                opened.set()  # the stream's first line: the server is inside its event loop
        ended.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert opened.wait(5.0), "the event stream never opened"
    assert not ended.is_set()
    begin_shutdown(demo_bot.server._app)
    assert ended.wait(5.0), "the event stream did not end"


def test_follow_up_attribution_rules() -> None:
    """Short parts end an answer; long ones may continue it; unknown follow-ups are shown as such."""
    conversation = Conversation("+15550001008")
    first, second = conversation.sent("one"), conversation.sent("two")
    conversation.replied(first, [DEFAULT_HOLDING_MESSAGE], 1.0, "holding")
    conversation.replied(second, [DEFAULT_HOLDING_MESSAGE], 1.0, "holding")
    t = first.t0
    conversation.followup("x" * 1600, t + 5.0, apology=False)  # long: may continue
    conversation.followup("y" * 1600, t + 5.1, apology=False)  # within the burst: same answer
    conversation.followup("short end", t + 5.2, apology=False)  # still the same answer (long before it)
    conversation.followup("second's answer", t + 5.3, apology=False)  # short before it: the next message
    conversation.followup("nobody's", t + 9.0, apology=True)  # nothing owed, the last part was short
    followups = [e for e in conversation.events if e["role"] == "bot" and e["kind"] != "holding"]
    assert [e["reply_to"] for e in followups] == [first.id, first.id, first.id, second.id, None]
    assert followups[2]["meta"] == "holding reply at 1.0 s → answer at 5.2 s · part 3"
    assert followups[4]["meta"] == "follow-up apology (to a message not sent from this page)"


def test_each_answer_names_the_tools_it_used_with_users_at_once_and_in_follow_ups(assistant_bot: DemoBot) -> None:
    """The demo model: a greeting, a sum through `calculate` inline and as a follow-up, the time through the clock."""
    alice, bob, carol = "+15550001011", "+15550001012", "+15550001013"
    sends = [
        (alice, "Hi! What can you do for me?"),
        (bob, "What's 17% of 2,340? [sim:delay=0.6]"),  # two model calls of 0.6 s: past the 1 s deadline
        (carol, "What time is it in Tokyo?"),
    ]
    with ThreadPoolExecutor(len(sends)) as pool:
        list(pool.map(lambda send: assistant_bot.send(*send), sends))
    assistant_bot.send(alice, "What's 17% of 2,340?")
    assistant_bot.send(carol, "thanks!")

    greeting, sum_inline = (e for e in assistant_bot.events(alice, 4) if e["role"] == "bot")
    assert "demo model" in greeting["text"] and "calculate exactly" in greeting["text"] and "tools" not in greeting
    assert (sum_inline["text"], sum_inline["tools"]) == ("17% of 2,340 is 397.8.", ["calculate"])
    assert INLINE.match(sum_inline["meta"])

    holding, follow_up = (e for e in assistant_bot.events(bob, 3) if e["role"] == "bot")
    assert holding["text"] == DEFAULT_HOLDING_MESSAGE and "tools" not in holding
    assert (follow_up["text"], follow_up["tools"]) == ("17% of 2,340 is 397.8.", ["calculate"])
    assert FOLLOWUP.match(follow_up["meta"]).group(2) == "answer"

    clock, thanks = (e for e in assistant_bot.events(carol, 4) if e["role"] == "bot")
    assert re.fullmatch(r"It's \d\d:\d\d on \w+day, \d+ \w+ \d{4} \(Asia/Tokyo\)\.", clock["text"]), clock["text"]
    assert clock["tools"] == ["get_current_time"]
    assert thanks["text"].startswith('[turn 2] (demo model) A real model would answer "thanks!" here.')
    assert 'Your previous message was "What time is it in Tokyo?"' in thanks["text"] and "tools" not in thanks


def test_the_page_learns_typing_and_read_from_the_sinks_typing_indicators(demo_bot: DemoBot) -> None:
    """/demo/typing: "typing…" while the sink holds a live indicator for the user (until the webhook's reply went out),
    and the user's messages that got one, as read."""
    user = "+15550001014"

    def typing() -> dict[str, Any]:
        response = demo_bot.client.get(f"{demo_bot.url}/demo/typing", params={"user": user})
        assert response.status_code == 200, response.text
        return dict(response.json())

    assert typing() == {"typing": False, "read": []}
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(demo_bot.send, user, "take a while [sim:delay=1.5]")  # holding reply at 1 s
        shown = wait_until(lambda: (state := typing())["typing"] and state, 1.0, "typing… within a second")
        assert shown["read"] == [1]
        held.result()
    assert typing() == {"typing": False, "read": [1]}  # the holding reply ended it
    demo_bot.send(user, "and this one [sim:delay=0.1]")  # its turn comes once the first one's answer is sent
    events = demo_bot.events(user, 5)
    assert [(e["id"], e["role"], e["text"]) for e in events][2:] == [
        (3, "user", "and this one [sim:delay=0.1]"),
        (4, "bot", "[turn 1] take a while"),
        (5, "bot", "[turn 2] and this one"),
    ]
    assert typing() == {"typing": False, "read": [1, 3]}
    assert demo_bot.client.get(f"{demo_bot.url}/demo/typing", params={"user": "nobody"}).status_code == 422
