"""1,000 users messaging at once with a model that needs 12 s: every webhook inside the deadline, every answer
delivered once, memory bounded.

The bot is a real `wabot serve` process; the OpenAI simulator and the Twilio sink run in the test process; the
load comes from a third process (tests/loadgen.py). Figures go to docs/reliability.md.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from bot.settings import DEFAULT_BUSY_MESSAGE, DEFAULT_HOLDING_MESSAGE
from tests.served import ServedBot, bot_env

USERS = 1000
DEADLINE_S = 8.0
MODEL_S = 12
# Generous for 2 cores that also run the simulator, the sink and the load generator; what matters is that the
# bot's own memory does not grow with anything but the conversations in flight.
PEAK_RSS_LIMIT_MIB = 512

# A thousand users at once load every core: nothing else runs meanwhile (its deadlines would be measured on a
# saturated machine), and these run on one worker, with the other test that loads every core.
pytestmark = [pytest.mark.exclusive, pytest.mark.xdist_group("heavy")]


def _bot_env(simulator_url: str, sink_url: str, **extra: str) -> dict[str, str]:
    settings = {"WABOT_REPLY_TIMEOUT": str(DEADLINE_S), "WABOT_FOLLOWUP_TIMEOUT": "120", **extra}
    return bot_env(simulator_url, sink_url, **settings)


def _wave(bot: ServedBot, sink, sim, wave: int) -> dict[str, float]:
    """One thousand users at once; every check of the promise; the figures of the wave."""
    sim.clear_calls()
    sink.clear()
    mark = len(bot.events())
    results, wall_s = bot.load(f"a hard question [sim:delay={MODEL_S}]", USERS, first_number=wave * USERS)

    # Every webhook: a 200 with the holding reply, none early.
    assert Counter(r["status"] for r in results) == {200: USERS}, [r for r in results if r["status"] != 200][:3]
    assert all(r["messages"] == [DEFAULT_HOLDING_MESSAGE] for r in results)
    client_times = sorted(float(r["since_sent"]) for r in results)
    assert client_times[0] >= DEADLINE_S

    # Every follow-up delivered exactly once, to the right user.
    delivered = sink.wait_for_messages(USERS, timeout=60)
    assert Counter(m["to"] for m in delivered) == Counter(f"whatsapp:{r['sender']}" for r in results)
    assert {m["body"] for m in delivered} == {"[turn 1] a hard question"}
    bot.wait_idle(timeout=30)
    assert len(sink.messages()) == USERS
    assert len(sim.calls()) == USERS

    events = bot.events()[mark:]
    totals = sorted(e["total_time"] for e in events if e.get("event") == "total_time")
    assert len(totals) == USERS
    assert totals[-1] <= DEADLINE_S + 0.5, totals[-10:]
    # As the caller's clock sees it, from the request on the wire. Beyond the bot's own +0.5 s (just checked) this
    # holds the socket queue of a thousand requests landing in one event loop at once and this generator's own
    # share of the two cores, reading a thousand answers at once: a bare FastAPI handler sleeping 8 s measures
    # 8.16-8.22 s here, and 9.04-9.63 s were seen on 2026-12-04. Far below the 12 s line and Twilio's 15 s.
    assert client_times[-1] <= DEADLINE_S + 2.5, client_times[-10:]
    assert sum(1 for e in events if e.get("event") == "followup_sent") == USERS
    assert not [e for e in events if e.get("level") in ("error", "critical")][:3]
    memory = bot.memory_kib()
    return {
        "wall_s": wall_s,
        "sent_p50": client_times[USERS // 2],
        "sent_p99": client_times[int(USERS * 0.99) - 1],
        "sent_max": client_times[-1],
        "total_p50": totals[USERS // 2],
        "total_max": totals[-1],
        "peak_mib": memory["VmHWM"] / 1024,
        "rss_mib": memory["VmRSS"] / 1024,
    }


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_thousand_users_at_once_with_a_12s_model(simulator, sink_server, tmp_path: Path) -> None:
    """Two waves of 1,000: peak RSS recorded and bounded; the second wave needs little more than the first."""
    sim, sim_url = simulator
    sink, sink_url = sink_server
    sim.set_mode("instant")
    bot = ServedBot(tmp_path, _bot_env(sim_url, sink_url, WABOT_MAX_CONCURRENT_RUNS=str(USERS))).wait_ready()
    try:
        baseline_mib = bot.memory_kib()["VmRSS"] / 1024
        first = _wave(bot, sink, sim, 1)
        second = _wave(bot, sink, sim, 2)
        assert first["peak_mib"] < PEAK_RSS_LIMIT_MIB and second["peak_mib"] < PEAK_RSS_LIMIT_MIB
        # Freed arenas stay mapped and fragmentation settles over a few waves: measured over five waves, peak RSS
        # 200, 235, 255, 255, 256 MiB (idle 101). A leak of 60 KB per message would make the second wave add
        # 60 % of what the first one needed; nothing kept per message keeps it near a third.
        first_needed = first["peak_mib"] - baseline_mib
        assert second["peak_mib"] - first["peak_mib"] < 0.6 * first_needed, (baseline_mib, first, second)
        for n, wave in enumerate((first, second), 1):
            print(
                f"\nload wave {n}: {USERS} users, model {MODEL_S} s, deadline {DEADLINE_S} s; generator wall "
                f"{wave['wall_s']:.1f} s; webhook time from request sent p50 {wave['sent_p50']:.3f} "
                f"p99 {wave['sent_p99']:.3f} max {wave['sent_max']:.3f} s; bot total_time p50 "
                f"{wave['total_p50']:.3f} max {wave['total_max']:.3f} s; RSS baseline {baseline_mib:.0f} MiB, "
                f"peak {wave['peak_mib']:.0f} MiB, after {wave['rss_mib']:.0f} MiB"
            )
    finally:
        bot.stop()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_thousand_users_over_the_concurrency_cap_all_answered(simulator, sink_server, tmp_path: Path) -> None:
    """With the default cap of 500 model runs and a 4 s model, 500 runs get a slot and 500 users get the busy reply
    at once; those get their answer as a follow-up once slots free up."""
    sim, sim_url = simulator
    sink, sink_url = sink_server
    sim.set_mode("instant")
    sim.clear_calls()
    sink.clear()
    # The cap is what this test is about, not the deadline: exactly 500 runs get a slot and 500 users the busy
    # reply at once. Whether a slot holder's 4 s answer still makes the deadline depends on how fast two cores
    # take in the burst (its answer came inline, or as the holding reply and then a follow-up: both keep the
    # promise); the deadline's own precision under a thousand users is the test above.
    bot = ServedBot(tmp_path, _bot_env(sim_url, sink_url, WABOT_MAX_CONCURRENT_RUNS="500")).wait_ready()
    try:
        results, _ = bot.load("a question [sim:delay=4]", USERS)
        replies = Counter(tuple(r["messages"]) for r in results)
        assert replies[(DEFAULT_BUSY_MESSAGE,)] == 500, replies
        inline = replies[("[turn 1] a question",)]
        assert inline + replies[(DEFAULT_HOLDING_MESSAGE,)] == 500, replies
        busy = [r for r in results if r["messages"] == [DEFAULT_BUSY_MESSAGE]]
        # The busy reply does not wait for the deadline: every one is back before the first holding reply could be.
        # It still queues behind the burst: 500 model calls starting and 1,000 webhooks on two cores shared with the
        # simulator, the sink and the load generator (the last busy reply at 3.4-5.6 s here on 2026-12-05, for code
        # old and new alike: half the deadline, the bound before, was inside that spread).
        busy_times = sorted(float(r["since_sent"]) for r in busy)
        assert busy_times[-1] < DEADLINE_S, busy_times[-5:]
        # Everyone not answered inline gets the answer as a follow-up, once.
        followed = [r for r in results if r["messages"] != ["[turn 1] a question"]]
        delivered = sink.wait_for_messages(len(followed), timeout=60)
        assert Counter(m["to"] for m in delivered) == Counter(f"whatsapp:{r['sender']}" for r in followed)
        assert {m["body"] for m in delivered} == {"[turn 1] a question"}
        bot.wait_idle(timeout=30)
        assert len(sink.messages()) == len(followed)
        assert len(sim.calls()) == USERS
        events = bot.events()
        assert sum(1 for e in events if e.get("event") == "runs_at_capacity") == 500
        print(
            f"\ncap: {USERS} users, cap 500, model 4 s: busy reply from request sent "
            f"p50 {busy_times[250]:.3f} max {busy_times[-1]:.3f} s; {inline} answered inline; all {len(delivered)} "
            "follow-ups delivered"
        )
    finally:
        bot.stop()
