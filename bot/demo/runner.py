"""Demo mode: the OpenAI simulator and the Twilio sink on loopback, and settings that point the bot at them.

The bot's real SDK code paths run unchanged; only the URLs and credentials differ. The Twilio auth token that signs
the demo's webhooks is TWILIO_AUTH_TOKEN when set, otherwise generated for the run: a fixed token, published with
the code, let anyone who reached the demo sign messages for it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from bot.demo.loopback import LoopbackServer
from bot.demo.openai_simulator import OpenAISimulator
from bot.demo.twilio_sink import TwilioSink
from bot.settings import Settings

DEMO_ACCOUNT_SID = "AC" + "d" * 32
DEMO_FROM = "whatsapp:+14155238886"  # Twilio's public sandbox number


@dataclass
class Demo:
    simulator: OpenAISimulator
    sink: TwilioSink
    servers: list[LoopbackServer]
    overrides: dict[str, Any]
    token_generated: bool = False

    def stop(self) -> None:
        self.simulator.shutdown()
        self.sink.shutdown()
        for server in reversed(self.servers):
            server.stop()


def start_demo(settings: Settings, *, bot_url: str, mode: str = "normal", echo: bool = False) -> tuple[Settings, Demo]:
    """Start the simulator and the sink; return settings wired to them, and the handle to stop them.

    `echo`: the simulator answers every message with its echo (as the tests' own simulator does).
    """
    simulator = OpenAISimulator(mode=mode, seed=settings.demo_seed, echo=echo)
    token = settings.secret("twilio_auth_token") or secrets.token_hex(32)
    sink = TwilioSink(account_sid=DEMO_ACCOUNT_SID, auth_token=token, status_callbacks=True)
    sim_server = LoopbackServer(simulator.app, name="openai-simulator")
    sink_server = LoopbackServer(sink.app, name="twilio-sink")
    sim_url = sim_server.start()
    sink_url = sink_server.start()
    sink.api_url = sink_url
    overrides: dict[str, Any] = {
        "openai_api_key": SecretStr("demo"),
        "openai_base_url": f"{sim_url}/v1",
        "twilio_account_sid": DEMO_ACCOUNT_SID,
        "twilio_auth_token": SecretStr(token),
        "twilio_whatsapp_from": DEMO_FROM,
        "twilio_api_url": sink_url,
        "public_url": bot_url,
    }
    generated = not settings.secret("twilio_auth_token")
    demo = Demo(simulator, sink, [sim_server, sink_server], overrides, token_generated=generated)
    return settings.model_copy(update=overrides), demo
