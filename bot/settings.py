"""All configuration of wabot, in one pydantic-settings class, from the environment and an optional `.env`.

Nothing else in the code base reads the environment: every knob is a field here.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from telemetry.spend import Price, parse_prices
from telemetry.thresholds import THRESHOLDS

DEFAULT_INSTRUCTIONS = (
    "You are a helpful assistant answering on WhatsApp. Keep answers short and plain: no markdown tables, "
    "no headings. Use the tools when they help."
)
DEFAULT_HOLDING_MESSAGE = "Thanks, I'm working on your answer. It needs a little longer; I'll send it here in a moment."
DEFAULT_APOLOGY_MESSAGE = (
    "Sorry, I couldn't put an answer together this time. Please send your message again in a minute."
)
DEFAULT_BUSY_MESSAGE = "I'm handling a lot of messages right now; your answer will follow here shortly."
DEFAULT_BUDGET_MESSAGE = (
    "You've reached today's limit for answers from me. I'll gladly answer again tomorrow (the day changes at "
    "midnight UTC)."
)
DEFAULT_RATE_LIMIT_MESSAGE = (
    "You're sending messages faster than I can answer them. I'll read new ones again in a minute."
)


class Settings(BaseSettings):
    """Every setting of the bot. Environment names are given by each field's alias."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    # OpenAI (the SDK's own variable names)
    openai_api_key: SecretStr | None = Field(None, validation_alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(None, validation_alias="OPENAI_BASE_URL")
    model: str = Field("gpt-4.1-mini", validation_alias="WABOT_MODEL")
    instructions_source: str = Field(DEFAULT_INSTRUCTIONS, validation_alias="WABOT_INSTRUCTIONS")
    max_tool_rounds: int = Field(4, ge=0, le=20, validation_alias="WABOT_MAX_TOOL_ROUNDS")
    # Spend bounds: what one model call may write (the Responses API's minimum is 16), and how many WhatsApp
    # messages (each one paid) one answer may take; the rest of a longer answer is cut with a marker.
    max_output_tokens: int = Field(1024, ge=16, validation_alias="WABOT_MAX_OUTPUT_TOKENS")
    max_reply_parts: int = Field(4, ge=1, validation_alias="WABOT_MAX_REPLY_PARTS")
    # Spend: prices per model (telemetry/spend.py parse_prices: `model=input/cached_input/output` USD per million
    # tokens, comma-separated, laid over the defaults), the operator's daily budget in USD that the spend alerts
    # compare against (0 = none), and the tokens (input + output) one user may use per UTC day (0 = no limit).
    prices: str = Field("", validation_alias="WABOT_PRICES")
    daily_budget_usd: float = Field(0.0, ge=0, allow_inf_nan=False, validation_alias="WABOT_DAILY_BUDGET_USD")
    user_daily_tokens: int = Field(200_000, ge=0, validation_alias="WABOT_USER_DAILY_TOKENS")
    budget_message: str = Field(DEFAULT_BUDGET_MESSAGE, validation_alias="WABOT_BUDGET_MESSAGE")

    # The deadline race
    # At most a second under Twilio's limit: the holding reply itself must still reach Twilio in time.
    reply_timeout: float = Field(
        8.0, gt=0, le=THRESHOLDS.total_time.twilio_limit_s - 1, validation_alias="WABOT_REPLY_TIMEOUT"
    )
    followup_timeout: float = Field(120.0, gt=0, le=3600, validation_alias="WABOT_FOLLOWUP_TIMEOUT")
    holding_message: str = Field(DEFAULT_HOLDING_MESSAGE, validation_alias="WABOT_HOLDING_MESSAGE")
    apology_message: str = Field(DEFAULT_APOLOGY_MESSAGE, validation_alias="WABOT_APOLOGY_MESSAGE")
    busy_message: str = Field(DEFAULT_BUSY_MESSAGE, validation_alias="WABOT_BUSY_MESSAGE")
    max_concurrent_runs: int = Field(500, ge=1, validation_alias="WABOT_MAX_CONCURRENT_RUNS")
    user_rate_limit: int = Field(20, ge=0, validation_alias="WABOT_USER_RATE_LIMIT")
    rate_limit_message: str = Field(DEFAULT_RATE_LIMIT_MESSAGE, validation_alias="WABOT_RATE_LIMIT_MESSAGE")

    # Twilio
    twilio_account_sid: str | None = Field(None, validation_alias="TWILIO_ACCOUNT_SID")
    twilio_auth_token: SecretStr | None = Field(None, validation_alias="TWILIO_AUTH_TOKEN")
    twilio_whatsapp_from: str | None = Field(None, validation_alias="TWILIO_WHATSAPP_FROM")
    twilio_signing_key: SecretStr | None = Field(None, validation_alias="WABOT_TWILIO_SIGNING_KEY")
    twilio_api_url: str = Field("https://api.twilio.com", validation_alias="WABOT_TWILIO_API_URL")
    twilio_call_timeout: float = Field(10.0, gt=0, validation_alias="WABOT_TWILIO_CALL_TIMEOUT")
    twilio_max_attempts: int = Field(5, ge=1, le=20, validation_alias="WABOT_TWILIO_MAX_ATTEMPTS")
    followup_give_up_s: float = Field(900.0, gt=0, le=86_400, validation_alias="WABOT_FOLLOWUP_GIVE_UP")
    public_url: str | None = Field(None, validation_alias="WABOT_PUBLIC_URL")
    max_body_bytes: int = Field(64 * 1024, gt=0, validation_alias="WABOT_MAX_BODY_BYTES")
    # WhatsApp's "typing…" (and read receipt) for a message accepted for a model run; some operators want neither.
    typing_indicator: bool = Field(True, validation_alias="WABOT_TYPING_INDICATOR")
    # Seconds between indicators while a follow-up is prepared: WhatsApp drops "typing…" after 25 s.
    typing_refresh_s: float = Field(20.0, ge=0.1, le=25.0, validation_alias="WABOT_TYPING_REFRESH")

    # Media of inbound messages (voice notes, photos, PDFs): fetched from Twilio into memory, never to disk.
    max_media_bytes: int = Field(16 * 1024 * 1024, gt=0, validation_alias="WABOT_MAX_MEDIA_BYTES")
    transcribe_model: str = Field("gpt-4o-mini-transcribe", validation_alias="WABOT_TRANSCRIBE_MODEL")

    # Storage
    store: str = Field("sqlite:///wabot.db", validation_alias="WABOT_STORE")
    dedupe_ttl_s: float = Field(7 * 24 * 3600, gt=0, validation_alias="WABOT_DEDUPE_TTL")
    # Seconds of silence after which a user's next message starts a new conversation (WhatsApp's session window):
    # an old conversation would be re-sent, and paid for, with every turn.
    conversation_ttl_s: float = Field(24 * 3600, gt=0, validation_alias="WABOT_CONVERSATION_TTL")
    redis_lease_s: float = Field(10.0, ge=0.5, le=300, validation_alias="WABOT_REDIS_LEASE")

    # Telemetry
    metrics_host: str = Field("127.0.0.1", validation_alias="WABOT_METRICS_HOST")
    log_message_bodies: bool = Field(False, validation_alias="WABOT_LOG_MESSAGE_BODIES")
    log_level: str = Field("info", validation_alias="WABOT_LOG_LEVEL")
    hash_key: SecretStr | None = Field(None, validation_alias="WABOT_HASH_KEY")
    prometheus_multiproc_dir: str | None = Field(None, validation_alias="PROMETHEUS_MULTIPROC_DIR")
    prometheus_url: str | None = Field(None, validation_alias="WABOT_PROMETHEUS_URL")
    otel_service_name: str = Field("wabot", validation_alias="OTEL_SERVICE_NAME")
    otel_traces_exporter: str = Field("otlp", validation_alias="OTEL_TRACES_EXPORTER")
    otel_exporter_otlp_endpoint: str | None = Field(None, validation_alias="OTEL_EXPORTER_OTLP_ENDPOINT")
    otel_exporter_otlp_traces_endpoint: str | None = Field(None, validation_alias="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    otel_exporter_otlp_protocol: str = Field(
        "http/protobuf",
        validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
    )
    otel_traces_sampler: str = Field("parentbased_always_on", validation_alias="OTEL_TRACES_SAMPLER")
    otel_traces_sampler_arg: float | None = Field(None, validation_alias="OTEL_TRACES_SAMPLER_ARG")
    # Share of the traces of messages that went fine exported; every timeout, error or rejection trace is exported
    # whatever this says (telemetry/trace_keeping.py; rejections up to 10 a second per reason, telemetry/flood.py).
    # 1 (every trace) by default.
    traces_keep_ok: float = Field(1.0, ge=0.0, le=1.0, validation_alias="WABOT_TRACES_KEEP_OK")
    # The standard switch: "true" turns tracing into a no-op (no spans, server spans included); metrics and logs stay.
    otel_sdk_disabled: bool = Field(False, validation_alias="OTEL_SDK_DISABLED")

    # Demo
    demo_seed: int | None = Field(None, validation_alias="WABOT_DEMO_SEED")
    # Where `wabot serve --demo` leaves the token it generated (owner-only), for `wabot send` run in the same place.
    demo_token_file: str = Field(".wabot-demo-token", validation_alias="WABOT_DEMO_TOKEN_FILE")

    @field_validator("twilio_api_url", "public_url", "openai_base_url", "prometheus_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @field_validator("prices")
    @classmethod
    def _check_prices(cls, value: str) -> str:
        parse_prices(value)  # a bad table is a start-up error naming the entry, not a wrong bill later
        return value

    @field_validator("otel_traces_exporter")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()

    @cached_property
    def instructions(self) -> str:
        """WABOT_INSTRUCTIONS as text; `@path` reads the file."""
        if self.instructions_source.startswith("@"):
            return Path(self.instructions_source[1:]).expanduser().read_text(encoding="utf-8").strip()
        return self.instructions_source

    @cached_property
    def price_table(self) -> dict[str, Price]:
        """The prices in use: the defaults with WABOT_PRICES laid over them."""
        return parse_prices(self.prices)

    def missing_for_production(self) -> list[str]:
        """Names of the settings `wabot serve` needs without --demo and does not have."""
        required = {
            "OPENAI_API_KEY": self.openai_api_key,
            "TWILIO_ACCOUNT_SID": self.twilio_account_sid,
            "TWILIO_AUTH_TOKEN": self.twilio_auth_token,
            "TWILIO_WHATSAPP_FROM": self.twilio_whatsapp_from,
            "WABOT_PUBLIC_URL": self.public_url,
        }
        return [name for name, value in required.items() if not value]

    def secret(self, name: str) -> str:
        """The plain value of a SecretStr field, or '' when unset."""
        value = getattr(self, name)
        return value.get_secret_value() if value is not None else ""

    def hash_key_value(self) -> str:
        """Key of the hashes that stand for phone numbers and bodies in telemetry: WABOT_HASH_KEY, else the Twilio
        auth token ('' in a bare test set-up: telemetry/privacy.py then uses its fixed fallback)."""
        return self.secret("hash_key") or self.secret("twilio_auth_token")
