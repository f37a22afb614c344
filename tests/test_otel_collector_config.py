"""otel-collector.yaml: every pipeline component is defined, every defined one is used, the names are real
contrib component types, and no phone number or message body survives the processors.

The collector binary is not available here; this is a static check of the wiring (`otelcol-contrib validate`
does the full check where the image runs).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "otel-collector.yaml"

# Component types of the opentelemetry-collector-contrib distribution that this kind of config may use.
KNOWN_TYPES = {
    "receivers": {"otlp", "prometheus", "hostmetrics", "filelog", "jaeger", "zipkin"},
    "processors": {
        "memory_limiter",
        "batch",
        "attributes",
        "redaction",
        "transform",
        "filter",
        "resource",
        "resourcedetection",
        "tail_sampling",
        "probabilistic_sampler",
        "k8sattributes",
    },
    "exporters": {"otlp", "otlphttp", "debug", "prometheus", "prometheusremotewrite", "file", "loki"},
    "connectors": {"spanmetrics", "servicegraph", "forward", "count", "routing"},
    "extensions": {"health_check", "pprof", "zpages", "file_storage", "basicauth", "bearertokenauth"},
}
UNUSED_BY_DESIGN = {("exporters", "debug")}  # documented in the file: add it to a pipeline to debug
SECTIONS = ("receivers", "processors", "exporters", "connectors", "extensions")


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text(encoding="utf-8"))


def _type(name: str) -> str:
    return name.split("/", 1)[0]


def _pipelines(config: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    return config["service"]["pipelines"]


def test_component_types_are_known_contrib_components(config: dict[str, Any]) -> None:
    for section in SECTIONS:
        for name in config.get(section) or {}:
            assert _type(name) in KNOWN_TYPES[section], f"{section}.{name}: unknown component type"


def test_pipeline_names_are_signal_types(config: dict[str, Any]) -> None:
    for name in _pipelines(config):
        assert _type(name) in {"traces", "metrics", "logs"}, name


def test_every_pipeline_component_is_defined(config: dict[str, Any]) -> None:
    connectors = set(config.get("connectors") or {})
    for pipeline, spec in _pipelines(config).items():
        for receiver in spec["receivers"]:
            assert receiver in (config.get("receivers") or {}) or receiver in connectors, (pipeline, receiver)
        for processor in spec.get("processors", []):
            assert processor in (config.get("processors") or {}), (pipeline, processor)
        for exporter in spec["exporters"]:
            assert exporter in (config.get("exporters") or {}) or exporter in connectors, (pipeline, exporter)
    for extension in config["service"].get("extensions", []):
        assert extension in (config.get("extensions") or {}), extension


def test_every_defined_component_is_used(config: dict[str, Any]) -> None:
    used: dict[str, set[str]] = {section: set() for section in SECTIONS}
    connectors = set(config.get("connectors") or {})
    for spec in _pipelines(config).values():
        for name in spec["receivers"]:
            used["connectors" if name in connectors else "receivers"].add(name)
        used["processors"].update(spec.get("processors", []))
        for name in spec["exporters"]:
            used["connectors" if name in connectors else "exporters"].add(name)
    used["extensions"].update(config["service"].get("extensions", []))
    for section in SECTIONS:
        for name in config.get(section) or {}:
            if (section, name) in UNUSED_BY_DESIGN:
                assert name not in used[section], f"{name} is documented as not in any pipeline"
                continue
            assert name in used[section], f"{section}.{name} is defined but not used"


def test_debug_exporter_is_documented(config: dict[str, Any]) -> None:
    assert "debug" in config["exporters"]
    assert "debug" in CONFIG.read_text(encoding="utf-8").split("receivers:", 1)[0], "header must explain debug"


def test_connectors_bridge_pipelines(config: dict[str, Any]) -> None:
    pipelines = _pipelines(config)
    for connector in config.get("connectors") or {}:
        exporting = [p for p, s in pipelines.items() if connector in s["exporters"]]
        receiving = [p for p, s in pipelines.items() if connector in s["receivers"]]
        assert exporting and receiving, connector
    spanmetrics_out = [p for p, s in pipelines.items() if "spanmetrics" in s["receivers"]]
    assert spanmetrics_out and all(_type(p) == "metrics" for p in spanmetrics_out)
    assert all("prometheus" in pipelines[p]["exporters"] for p in spanmetrics_out)
    assert "spanmetrics" in pipelines["traces"]["exporters"]


def test_spanmetrics_buckets_match_the_bot(config: dict[str, Any]) -> None:
    buckets = config["connectors"]["spanmetrics"]["histogram"]["explicit"]["buckets"]

    def seconds(value: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(ms|s)", value).groups()
        return float(number) / (1000 if unit == "ms" else 1)

    assert [seconds(b) for b in buckets] == [0.25, 0.5, 1, 2, 4, 6, 8, 10, 12, 15, 20, 30, 60, 120]


def test_processor_order(config: dict[str, Any]) -> None:
    for pipeline, spec in _pipelines(config).items():
        processors = spec.get("processors", [])
        assert processors[0] == "memory_limiter", pipeline
        assert processors[-1] == "batch", pipeline
    traces = _pipelines(config)["traces"]["processors"]
    assert traces.index("attributes/strip-personal-data") < traces.index("batch")
    assert traces.index("redaction/phone-numbers") < traces.index("batch")


def test_exporters_and_receivers_endpoints(config: dict[str, Any]) -> None:
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"
    tempo = config["exporters"]["otlp/tempo"]
    assert tempo["endpoint"] == "tempo:4317"
    assert tempo["tls"]["insecure"] is True
    assert config["exporters"]["prometheus"]["endpoint"] == "0.0.0.0:8889"


# --- personal data ------------------------------------------------------------------------------------------


def _scrub(config: dict[str, Any], attributes: dict[str, str]) -> dict[str, str]:
    """What the traces pipeline's attributes + redaction processors leave of a span's attributes."""
    result = dict(attributes)
    for processor in _pipelines(config)["traces"]["processors"]:
        spec = config["processors"][processor]
        if _type(processor) == "attributes":
            for action in spec["actions"]:
                assert action["action"] == "delete", action
                if "key" in action:
                    result.pop(action["key"], None)
                else:
                    pattern = re.compile(action["pattern"])
                    result = {k: v for k, v in result.items() if not pattern.search(k)}
        elif _type(processor) == "redaction":
            assert spec["allow_all_keys"] is True  # otherwise every attribute not listed would be dropped
            for blocked in spec["blocked_values"]:
                pattern = re.compile(blocked)
                result = {k: pattern.sub("****", v) for k, v in result.items()}
    return result


def test_redaction_covers_phone_numbers(config: dict[str, Any]) -> None:
    blocked = [re.compile(p) for p in config["processors"]["redaction/phone-numbers"]["blocked_values"]]
    for phone in ("whatsapp:+15551234567", "+4915112345678", "whatsapp:+447700900123", "To=%2B15551234567"):
        assert any(p.search(phone) for p in blocked), phone
    for harmless in ("wabot", "gpt-4.1-mini", "SM0123456789abcdef", "200", "whatsapp"):
        assert not any(p.search(harmless) for p in blocked), harmless


def test_personal_data_does_not_survive_the_traces_pipeline(config: dict[str, Any]) -> None:
    span = {
        "messaging.destination.name": "whatsapp:+15551234567",
        "wabot.user.phone": "+15551234567",
        "wabot.message.body": "my secret question",
        "gen_ai.prompt.0.content": "my secret question",
        "gen_ai.completion.0.content": "the answer",
        "exception.message": "Twilio 21211: invalid To number whatsapp:+15551234567",
        "url.full": "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages.json?To=%2B15551234567",
        "wabot.user.hash": "3f2a9c0d1e2b4a5c",
        "gen_ai.request.model": "gpt-4.1-mini",
        "twilio.message.sid": "SM0123456789abcdef0123456789abcdef",
    }
    scrubbed = _scrub(config, span)
    for key in (
        "messaging.destination.name",
        "wabot.user.phone",
        "wabot.message.body",
        "gen_ai.prompt.0.content",
        "gen_ai.completion.0.content",
    ):
        assert key not in scrubbed, key
    assert "+15551234567" not in scrubbed["exception.message"]
    assert "15551234567" not in scrubbed["url.full"]
    assert "whatsapp:****" in scrubbed["exception.message"] or "****" in scrubbed["exception.message"]
    # Kept: the keyed hash, the model, the message SID.
    assert scrubbed["wabot.user.hash"] == span["wabot.user.hash"]
    assert scrubbed["gen_ai.request.model"] == "gpt-4.1-mini"
    assert scrubbed["twilio.message.sid"] == span["twilio.message.sid"]
