"""What every scenario shares: the fake account, and the sizes of a full and a quick (`BENCH_QUICK=1`) run."""

from __future__ import annotations

from dataclasses import dataclass

ACCOUNT_SID = "AC" + "b" * 32
AUTH_TOKEN = "bench-auth-token-not-secret"
BOT_NUMBER = "whatsapp:+14155238886"


@dataclass(frozen=True)
class Sizes:
    """How long and how big each scenario is."""

    precision_users: tuple[int, ...]  # concurrent users of the deadline-precision runs
    precision_seconds: float  # length of one precision run
    deadline_s: float  # WABOT_REPLY_TIMEOUT of the precision runs
    model_s: float  # the simulator's answer time in the precision runs (past the deadline: a follow-up)
    fast_connections: int  # concurrent connections of the fast-path runs
    fast_seconds: float  # length of one fast-path run (after the warm-up)
    warmup_seconds: float
    scaling_workers: tuple[int, ...]
    drain_messages: int
    memory_conversations: tuple[int, ...]
    generator_seconds: float
    instruction_messages: int  # messages counted per configuration under callgrind (whole span batches)
    instruction_batch: int  # spans per OTLP export batch in that run
    instruction_rounds: int
    gc_levels: tuple[int, ...]  # runs in flight at which bench/incident.py counts objects and times a full pass
    incident_rate: float  # webhooks a second of the incident run
    incident_seconds: float
    incident_model_s: float  # the model's answer time during the incident


FULL = Sizes(
    precision_users=(1, 100, 500, 1000),
    precision_seconds=40.0,
    deadline_s=8.0,
    model_s=20.0,
    fast_connections=32,
    fast_seconds=15.0,
    warmup_seconds=3.0,
    scaling_workers=(1, 2, 4),
    drain_messages=1000,
    memory_conversations=(1000, 3000),
    generator_seconds=10.0,
    instruction_messages=256,
    instruction_batch=512,
    instruction_rounds=2,
    gc_levels=(1000, 2000, 5000),
    incident_rate=100.0,
    incident_seconds=60.0,
    incident_model_s=60.0,
)

QUICK = Sizes(
    precision_users=(1, 100),
    precision_seconds=5.0,
    deadline_s=2.0,
    model_s=4.0,
    fast_connections=16,
    fast_seconds=4.0,
    warmup_seconds=1.0,
    scaling_workers=(1, 2),
    drain_messages=200,
    memory_conversations=(200,),
    generator_seconds=3.0,
    instruction_messages=32,
    instruction_batch=64,
    instruction_rounds=1,
    gc_levels=(200, 500),
    incident_rate=20.0,
    incident_seconds=10.0,
    incident_model_s=10.0,
)
