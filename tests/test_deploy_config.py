"""deploy/: Prometheus config passes promtool, the compose file is consistent (Docker cannot run here).

The compose checks parse deploy/docker-compose.yml and follow every path it mounts, so a renamed file or a
config path that only works on one side of a mount fails here instead of at `docker compose up`.
"""

from __future__ import annotations

import posixpath
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from telemetry.thresholds import THRESHOLDS
from tests.binaries import promtool

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _compose() -> dict[str, Any]:
    return _yaml(COMPOSE)


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of every volume entry, short or long syntax."""
    mounts = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, target = entry.split(":")[:2]
        else:
            source, target = entry.get("source", ""), entry["target"]
        mounts.append((source, target))
    return mounts


def _bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    return [
        ((DEPLOY / source).resolve(), target) for source, target in _mounts(service) if source.startswith((".", "/"))
    ]


def _host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """The host file behind `container_path`, through the service's bind mounts (longest target wins)."""
    container_path = posixpath.normpath(container_path)
    best: tuple[int, Path] | None = None
    for source, target in _bind_mounts(service):
        target = posixpath.normpath(target)
        if container_path == target or container_path.startswith(target + "/"):
            rest = container_path[len(target) :].lstrip("/")
            candidate = source / rest if rest else source
            if best is None or len(target) > best[0]:
                best = (len(target), candidate)
    return best[1] if best else None


def _flag(command: list[str], name: str) -> str:
    for arg in command:
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    pytest.fail(f"{name} not in {command}")


# --- Prometheus ---------------------------------------------------------------------------------------------


@pytest.mark.prometheus
def test_promtool_check_config() -> None:
    result = subprocess.run(
        [promtool(), "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "1 rule files found" in output, output


def test_prometheus_scrapes_the_bot_and_loads_the_rules() -> None:
    config = _yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert [t for c in jobs["wabot"]["static_configs"] for t in c["targets"]] == ["wabot:9464"]
    assert [t for c in jobs["otel-collector-spanmetrics"]["static_configs"] for t in c["targets"]] == [
        "otel-collector:8889"
    ]
    # Paths are relative to the config file, in the repository as in the container.
    assert config["rule_files"] == ["../alerts/wabot.rules.yml"]
    assert (PROMETHEUS_CONFIG.parent / config["rule_files"][0]).resolve() == ROOT / "alerts" / "wabot.rules.yml"
    targets = [t for am in config["alerting"]["alertmanagers"] for c in am["static_configs"] for t in c["targets"]]
    assert targets == ["alertmanager:9093"]
    assert "--enable-feature=exemplar-storage" in PROMETHEUS_CONFIG.read_text(encoding="utf-8")


def test_alert_rules_job_name_matches_the_scrape_job() -> None:
    rules = (ROOT / "alerts" / "wabot.rules.yml").read_text(encoding="utf-8")
    assert f"up{{{THRESHOLDS.job_selector}}}" in rules
    assert THRESHOLDS.job in {job["job_name"] for job in _yaml(PROMETHEUS_CONFIG)["scrape_configs"]}


# --- docker compose -----------------------------------------------------------------------------------------


def test_compose_services() -> None:
    services = _compose()["services"]
    assert {"wabot", "otel-collector", "prometheus", "alertmanager", "grafana", "tempo"} <= services.keys()


def test_every_image_is_pinned() -> None:
    for name, service in _compose()["services"].items():
        if "build" in service and service.get("image", "").endswith(":local"):
            continue
        image = service.get("image")
        assert image, f"{name}: no image and no build"
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: image {image!r} is not pinned"
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.startswith("FROM "):
            image = line.split()[1]
            assert ":" in image and not image.endswith(":latest"), line


def test_every_mounted_local_file_exists() -> None:
    compose = _compose()
    named = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source, target in _mounts(service):
            if source.startswith((".", "/")):
                path = (DEPLOY / source).resolve()
                assert path.exists(), f"{name}: mounted {source} -> {target} does not exist ({path})"
            else:
                assert source in named, f"{name}: volume {source!r} is not declared"
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context}"
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']}"


def test_dockerfile_copies_existing_files_and_serves_on_all_interfaces() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    context = (DEPLOY / _compose()["services"]["wabot"]["build"]["context"]).resolve()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (context / source).exists(), f"Dockerfile copies missing {source}"
    # The image installs what the tests ran with: the lock's runtime part, every hash checked, then the project alone.
    assert (
        "uv export --frozen --no-emit-project" in text
        and "pip install --require-hashes -r /tmp/requirements.txt" in text
    )
    assert "pip install --no-deps ." in text
    cmd = _compose()["services"]["wabot"]["command"]
    assert cmd[:2] == ["wabot", "serve"] and "--host" in cmd and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--metrics-port") + 1] == "9464"
    assert _compose()["services"]["wabot"]["environment"]["WABOT_METRICS_HOST"] == "0.0.0.0"


def test_prometheus_container_finds_its_config_and_rules() -> None:
    service = _compose()["services"]["prometheus"]
    assert "--enable-feature=exemplar-storage" in service["command"]
    config_in_container = _flag(service["command"], "--config.file")
    host_config = _host_path(service, config_in_container)
    assert host_config == PROMETHEUS_CONFIG.resolve()
    for rule_file in _yaml(host_config)["rule_files"]:
        in_container = posixpath.normpath(posixpath.join(posixpath.dirname(config_in_container), rule_file))
        host_rules = _host_path(service, in_container)
        assert host_rules is not None and host_rules.is_file(), f"{rule_file} -> {in_container} is not mounted"
        assert host_rules == (ROOT / "alerts" / "wabot.rules.yml").resolve()


def test_alertmanager_and_collector_containers_find_their_config() -> None:
    services = _compose()["services"]
    am = services["alertmanager"]
    assert _host_path(am, _flag(am["command"], "--config.file")) == (ROOT / "alerts" / "alertmanager.yml").resolve()
    otel = services["otel-collector"]
    assert _host_path(otel, _flag(otel["command"], "--config")) == (ROOT / "otel-collector.yaml").resolve()
    tempo = services["tempo"]
    assert _host_path(tempo, _flag(tempo["command"], "-config.file")) == (DEPLOY / "tempo.yaml").resolve()


def test_bot_exports_traces_to_the_collector() -> None:
    env = _compose()["services"]["wabot"]["environment"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    collector = _yaml(ROOT / "otel-collector.yaml")
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")


def test_tempo_receives_what_the_collector_sends() -> None:
    tempo = _yaml(DEPLOY / "tempo.yaml")
    assert tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert tempo["server"]["http_listen_port"] == 3200
    exporters = _yaml(ROOT / "otel-collector.yaml")["exporters"]
    assert exporters["otlp/tempo"]["endpoint"] == "tempo:4317"


def test_grafana_provisioning_matches_the_mounts() -> None:
    """The dashboard provider loads from where compose mounts dashboards/; datasources use compose names."""
    grafana = _compose()["services"]["grafana"]
    assert _host_path(grafana, "/etc/grafana/provisioning") == (ROOT / "dashboards" / "provisioning").resolve()
    providers = _yaml(ROOT / "dashboards" / "provisioning" / "dashboards" / "wabot.yml")["providers"]
    for provider in providers:
        host = _host_path(grafana, provider["options"]["path"])
        assert host is not None and host.is_dir(), provider["options"]["path"]
        assert (host / "wabot.json").is_file()
    datasources = _yaml(ROOT / "dashboards" / "provisioning" / "datasources" / "wabot.yml")["datasources"]
    urls = {d["type"]: d["url"] for d in datasources}
    assert urls["prometheus"] == "http://prometheus:9090"
    assert urls["tempo"] == "http://tempo:3200"


# --- what the stack exposes (security review) -----------------------------------------------------------------


def _published(entry: Any) -> tuple[str, str]:
    """(host address, host port) of a `ports` entry; address '' means every interface."""
    if isinstance(entry, dict):
        return entry.get("host_ip", ""), str(entry.get("published", ""))
    parts = str(entry).split(":")
    if len(parts) == 3:
        return parts[0], parts[1]
    return "", parts[0]


def test_only_the_webhook_is_published_on_every_interface() -> None:
    services = _compose()["services"]
    public = {
        (name, port)
        for name, service in services.items()
        for address, port in map(_published, service.get("ports", []))
        if address not in ("127.0.0.1", "::1", "localhost")
    }
    assert public == {("wabot", "8000")}
    # The collector's OTLP ingest is for the compose network only.
    assert not services["otel-collector"].get("ports")


def test_grafana_anonymous_users_only_view_and_prometheus_cannot_be_shut_down_over_http() -> None:
    services = _compose()["services"]
    grafana = services["grafana"]["environment"]
    if str(grafana.get("GF_AUTH_ANONYMOUS_ENABLED", "false")).lower() == "true":
        assert grafana.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer"
    assert "--web.enable-lifecycle" not in services["prometheus"]["command"]


def test_the_image_keeps_the_metrics_port_on_loopback() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert not re.search(r"WABOT_METRICS_HOST\s*=\s*0\.0\.0\.0", text)
    # Compose opens it inside the container for its Prometheus, and publishes it on the host's loopback only.
    wabot = _compose()["services"]["wabot"]
    assert [_published(p) for p in wabot["ports"] if _published(p)[1] == "9464"] == [("127.0.0.1", "9464")]
