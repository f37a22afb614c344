"""deploy/kubernetes/: every overlay renders with the real `kubectl kustomize`, validates, and says what wabot needs.

No cluster runs here, so the rendered objects are checked instead: against the Kubernetes schemas of every version
wabot supports (kubernetes-validate, strict: an unknown field fails), the Prometheus Operator's kinds against the
vendored subset of their CRD schemas (tests/fixtures/prometheus_operator), and property by property against the
bot itself: its settings, ports, shutdown timing, metric names, alert rules, dashboard and collector config.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions
from pydantic import AliasChoices, SecretStr

from bot.settings import Settings
from deploy.kubernetes import generate
from telemetry import metrics
from tests.kustomize import KUBERNETES, OVERLAYS, ROOT, render

# Kubernetes versions the manifests are for: from 1.30 the preStop `sleep` action is on by default (its schema is
# in 1.29 too, behind an alpha feature gate, so no schema check can tell; hence the stated minimum).
SUPPORTED = [v for v in dict.fromkeys(all_versions()) if (1, 30) <= tuple(map(int, v.split(".")[:2])) <= (1, 37)]
OPERATOR_SCHEMAS = json.loads((ROOT / "tests/fixtures/prometheus_operator/schemas.json").read_text(encoding="utf-8"))
OPERATOR_KINDS = {key.rsplit("/", 1)[1] for key in OPERATOR_SCHEMAS["schemas"]}
BOT_LABELS = {"app.kubernetes.io/name": "wabot", "app.kubernetes.io/component": "bot"}
SLACK_S = 5  # closing connections, paying owed Redis writes and flushing telemetry after the webhooks finished


def objects(overlay: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [o for o in render(overlay) if kind is None or o["kind"] == kind]


def one(overlay: str, kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects(overlay, kind) if o["metadata"]["name"] == name]
    return found


def bot_container(overlay: str) -> dict[str, Any]:
    [container] = one(overlay, "Deployment", "wabot")["spec"]["template"]["spec"]["containers"]
    return container


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels only, as these manifests use) matches `labels`."""
    assert set(selector) <= {"matchLabels"}, selector
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def settings_aliases() -> dict[str, str]:
    """Environment name -> field name of every setting."""
    out = {}
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        for choice in alias.choices if isinstance(alias, AliasChoices) else [alias] if alias else []:
            out[str(choice)] = name
    return out


def config(overlay: str) -> dict[str, str]:
    return one(overlay, "ConfigMap", "wabot-config")["data"]


def container_port(container: dict[str, Any], name_or_number: str | int) -> int:
    for port in container["ports"]:
        if name_or_number in (port["name"], port["containerPort"]):
            return port["containerPort"]
    raise AssertionError(f"{container['name']} has no port {name_or_number}")


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


# --- rendering and schemas ----------------------------------------------------------------------------------


def test_generated_manifests_are_current() -> None:
    for path, text in generate.rendered().items():
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale: run python deploy/kubernetes/generate.py"
    assert generate.main(["--check"]) == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_unique_objects_in_one_namespace(overlay: str) -> None:
    rendered = objects(overlay)
    keys = [(o["kind"], o["metadata"]["name"]) for o in rendered]
    assert len(keys) == len(set(keys)), keys
    assert {o["metadata"].get("namespace") for o in rendered} == {"wabot"}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= {
        k for k, _ in keys
    }


def test_overlays_are_the_documented_ones() -> None:
    assert set(OVERLAYS) == {"example", "managed-redis", "in-flight-hpa"}


def _distinct_builtin_objects() -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for overlay in OVERLAYS:
        for obj in objects(overlay):
            if obj["kind"] not in OPERATOR_KINDS:
                seen.setdefault(json.dumps(obj, sort_keys=True), obj)
    return list(seen.values())


@pytest.mark.parametrize("version", SUPPORTED)
def test_builtin_objects_validate_against_the_kubernetes_schemas(version: str) -> None:
    assert len(SUPPORTED) >= 6, SUPPORTED  # 1.30 ... 1.37 as shipped by kubernetes-validate
    for obj in _distinct_builtin_objects():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {exc.message} at {list(exc.path)}")


def test_strict_validation_refuses_a_misspelt_field() -> None:
    deployment = copy.deepcopy(one("example", "Deployment", "wabot"))
    kubernetes_validate.validate(deployment, SUPPORTED[0], strict=True)
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, SUPPORTED[0], strict=True)


def _validate_operator_object(obj: dict[str, Any]) -> None:
    schema = OPERATOR_SCHEMAS["schemas"][f"{obj['apiVersion']}/{obj['kind']}"]
    jsonschema.Draft202012Validator(schema).validate(obj)
    if obj["kind"] == "AlertmanagerConfig":
        # Child routes are opaque to the CRD; the operator reads them as routes.
        route_schema = schema["properties"]["spec"]["properties"]["route"]
        pending = list(obj["spec"]["route"].get("routes", []))
        while pending:
            route = pending.pop()
            jsonschema.Draft202012Validator(route_schema).validate(route)
            pending += route.get("routes", [])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_operator_objects_validate_against_their_crd_schemas(overlay: str) -> None:
    found = [o for o in objects(overlay) if o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {o["kind"] for o in found} >= {"ServiceMonitor", "PrometheusRule", "AlertmanagerConfig"}
    for obj in found:
        _validate_operator_object(obj)


def test_crd_validation_refuses_unknown_fields_and_bad_values() -> None:
    monitor = one("example", "ServiceMonitor", "wabot")
    typo = copy.deepcopy(monitor)
    typo["spec"]["joblabel"] = typo["spec"].pop("jobLabel")
    bad_interval = copy.deepcopy(monitor)
    bad_interval["spec"]["endpoints"][0]["interval"] = "15 seconds"
    route = copy.deepcopy(one("example", "AlertmanagerConfig", "wabot"))
    route["spec"]["route"]["routes"][0]["matchers"][0]["matchType"] = "=="
    for broken in (typo, bad_interval, route):
        with pytest.raises(jsonschema.ValidationError):
            _validate_operator_object(broken)


# --- the bot's Deployment -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_three_replicas_on_redis_rolled_without_dropping_a_webhook(overlay: str) -> None:
    deployment = one(overlay, "Deployment", "wabot")
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["strategy"]["rollingUpdate"]["maxSurge"] >= 1
    assert selects(spec["selector"], spec["template"]["metadata"]["labels"])
    assert spec["template"]["metadata"]["labels"] | BOT_LABELS == spec["template"]["metadata"]["labels"]
    store = config(overlay).get("WABOT_STORE")
    if overlay == "managed-redis":
        # A URL with a password: from the Secret, and no start without it (not the image's SQLite default).
        assert store is None
        [env] = [e for e in bot_container(overlay)["env"] if e["name"] == "WABOT_STORE"]
        assert env["valueFrom"] == {"secretKeyRef": {"name": "wabot-secrets", "key": "WABOT_STORE"}}
    else:
        assert store is not None and store.startswith("redis://")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_come_from_the_configmap_and_the_operators_secret(overlay: str) -> None:
    container = bot_container(overlay)
    sources = [next(iter(s)) for s in container["envFrom"]]
    assert sources == ["configMapRef", "secretRef"]  # the Secret comes last: its keys win
    assert container["envFrom"][0]["configMapRef"]["name"] == "wabot-config"
    assert container["envFrom"][1]["secretRef"]["name"] == "wabot-secrets"
    assert "optional" not in container["envFrom"][1]["secretRef"]  # no start without credentials
    assert not objects(overlay, "Secret"), "secret values never live in the repository"
    data = config(overlay)
    aliases = settings_aliases()
    assert set(data) <= set(aliases), set(data) - set(aliases)
    secret_fields = {n for n, f in Settings.model_fields.items() if SecretStr in getattr(f.annotation, "__args__", ())}
    assert not {aliases[k] for k in data} & secret_fields, "a secret setting in the ConfigMap"
    Settings(_env_file=None, **data)  # the values validate as the bot reads them


def test_readme_documents_the_secret_with_every_setting_the_bot_needs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    [command] = re.findall(r"create secret generic wabot-secrets((?:.*\\\n)*.*)", readme)
    in_secret = set(re.findall(r"--from-literal=([A-Z_]+)=", command))
    required = set(Settings.model_construct().missing_for_production())
    assert required <= in_secret | set(config("example")), required - in_secret - set(config("example"))
    assert "WABOT_HASH_KEY" in in_secret  # one key for every replica, so a user's hash is the same everywhere
    assert in_secret <= set(settings_aliases())
    assert "kubectl apply -k deploy/kubernetes/overlays/example" in readme
    assert "--from-literal=WABOT_STORE=" in readme  # overlays/managed-redis takes the store URL from the Secret
    for overlay in OVERLAYS:
        assert f"overlays/{overlay}" in readme


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_the_health_endpoints_on_the_webhook_port(overlay: str) -> None:
    from bot.health import router

    container = bot_container(overlay)
    command = container["command"]
    webhook_port, metrics_port = int(flag(command, "--port")), int(flag(command, "--metrics-port"))
    assert container_port(container, "http") == webhook_port
    assert container_port(container, "metrics") == metrics_port
    served = {route.path for route in router.routes}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and path in served
        assert container_port(container, get["port"]) == webhook_port
    assert container["readinessProbe"]["timeoutSeconds"] > 2  # /readyz itself gives the store 2 s


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_lets_in_flight_webhooks_finish_after_the_endpoint_is_gone(overlay: str) -> None:
    pod = one(overlay, "Deployment", "wabot")["spec"]["template"]["spec"]
    container = bot_container(overlay)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= 5  # endpoint removal reaches the ingress controller and kube-proxy first
    configured = float(config(overlay).get("WABOT_REPLY_TIMEOUT", Settings.model_fields["reply_timeout"].default))
    [limit] = [m.le for m in Settings.model_fields["reply_timeout"].metadata if getattr(m, "le", None) is not None]
    for reply_timeout in (configured, limit):
        # bot/server.py: after SIGTERM uvicorn waits int(WABOT_REPLY_TIMEOUT) + 2 s for in-flight webhooks.
        needed = pre_stop + int(reply_timeout) + 2 + SLACK_S
        assert pod["terminationGracePeriodSeconds"] >= needed, (reply_timeout, needed)
    assert configured <= 14


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_locked_down(overlay: str) -> None:
    workloads = objects(overlay, "Deployment") + objects(overlay, "StatefulSet")
    assert workloads
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        name = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context.get("privileged", False) is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image


def test_the_bot_runs_as_the_images_user_and_writes_only_to_an_empty_dir() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    uid = int(re.search(r"useradd [^\n]*--uid (\d+)", dockerfile).group(1))
    pod = one("example", "Deployment", "wabot")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == uid
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in bot_container("example")["volumeMounts"]}
    assert mounts == {"/tmp": "tmp"} and "emptyDir" in volumes["tmp"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budget_and_spread_cover_the_bots_pods(overlay: str) -> None:
    deployment = one(overlay, "Deployment", "wabot")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = one(overlay, "PodDisruptionBudget", "wabot")["spec"]
    assert selects(pdb["selector"], labels)
    assert pdb["maxUnavailable"] == 1 < deployment["spec"]["replicas"]
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    by_node = [c for c in spread if c["topologyKey"] == "kubernetes.io/hostname"]
    assert by_node and by_node[0]["maxSkew"] == 1 and by_node[0]["whenUnsatisfiable"] == "DoNotSchedule"
    assert all(selects(c["labelSelector"], labels) for c in spread)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_scales_the_deployment_on_cpu(overlay: str) -> None:
    deployment = one(overlay, "Deployment", "wabot")
    hpa = one(overlay, "HorizontalPodAutoscaler", "wabot")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "wabot"}
    assert hpa["minReplicas"] >= deployment["spec"]["replicas"] and hpa["maxReplicas"] > hpa["minReplicas"]
    cpu = [m for m in hpa["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and cpu[0]["resource"]["target"]["type"] == "Utilization"
    assert bot_container(overlay)["resources"]["requests"]["cpu"]  # utilization is relative to the request


def test_optional_autoscaling_on_runs_in_flight_uses_a_metric_the_bot_exports_and_the_adapter_serves() -> None:
    hpa = one("in-flight-hpa", "HorizontalPodAutoscaler", "wabot")["spec"]
    [pods] = [m["pods"] for m in hpa["metrics"] if m["type"] == "Pods"]
    name = pods["metric"]["name"]
    exported = {m._name for m in vars(metrics).values() if hasattr(m, "_name") and hasattr(m, "_type")}
    assert name in exported and metrics.RUNS_ACTIVE._name == name
    adapter = KUBERNETES / "components" / "hpa-in-flight" / "prometheus-adapter-values.yaml"
    [rule] = yaml.safe_load(adapter.read_text(encoding="utf-8"))["rules"]["custom"]
    assert rule["seriesQuery"].startswith(f"{name}{{") and rule["name"]["as"] == name
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    slots = int(
        config("in-flight-hpa").get("WABOT_MAX_CONCURRENT_RUNS", Settings.model_fields["max_concurrent_runs"].default)
    )
    assert float(pods["target"]["averageValue"]) < slots  # scale out before a replica runs out of model slots
    assert [m["type"] for m in one("example", "HorizontalPodAutoscaler", "wabot")["spec"]["metrics"]] == ["Resource"]


# --- network ------------------------------------------------------------------------------------------------


def _policy_ports(rule: dict[str, Any], container: dict[str, Any]) -> set[int]:
    return {container_port(container, p["port"]) for p in rule["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_lets_only_the_ingress_reach_the_webhook_and_only_prometheus_the_metrics(overlay: str) -> None:
    labels = one(overlay, "Deployment", "wabot")["spec"]["template"]["metadata"]["labels"]
    container = bot_container(overlay)
    policies = [p for p in objects(overlay, "NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]
    assert [p["metadata"]["name"] for p in policies] == ["wabot"]
    spec = policies[0]["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    allowed: dict[int, list[dict[str, Any]]] = {}
    for rule in spec["ingress"]:
        assert rule.get("from") and rule.get("ports"), "a rule without `from` or `ports` opens the pod to all"
        for port in _policy_ports(rule, container):
            allowed.setdefault(port, []).extend(rule["from"])
    webhook, metrics_port = container_port(container, "http"), container_port(container, "metrics")
    assert set(allowed) == {webhook, metrics_port}
    [ingress_peer] = allowed[webhook]
    assert ingress_peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "ingress-nginx"}
    assert ingress_peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "ingress-nginx"}
    [prometheus_peer] = allowed[metrics_port]
    assert prometheus_peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert prometheus_peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_and_ingress_expose_only_the_twilio_webhooks_at_the_public_url(overlay: str) -> None:
    from bot.webhook import router

    labels = one(overlay, "Deployment", "wabot")["spec"]["template"]["metadata"]["labels"]
    container = bot_container(overlay)
    service = one(overlay, "Service", "wabot")
    assert selects({"matchLabels": service["spec"]["selector"]}, labels)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert container_port(container, ports["http"]["targetPort"]) == container_port(container, "http")
    assert container_port(container, ports["metrics"]["targetPort"]) == container_port(container, "metrics")
    [ingress] = objects(overlay, "Ingress")
    [rule] = ingress["spec"]["rules"]
    paths = rule["http"]["paths"]
    assert {p["path"] for p in paths} == {"/whatsapp", "/whatsapp/status"} <= {r.path for r in router.routes}
    assert {p["pathType"] for p in paths} == {"Exact"}
    assert {(p["backend"]["service"]["name"], p["backend"]["service"]["port"]["name"]) for p in paths} == {
        ("wabot", "http")
    }
    assert [rule["host"]] == [h for tls in ingress["spec"]["tls"] for h in tls["hosts"]]
    public = urlsplit(config(overlay)["WABOT_PUBLIC_URL"])
    assert public.scheme == "https" and public.hostname == rule["host"] and public.path in ("", "/")


def test_bundled_redis_is_durable_and_reachable_only_from_the_bot() -> None:
    store = urlsplit(config("example")["WABOT_STORE"])
    service = one("example", "Service", store.hostname)
    [port] = [p for p in service["spec"]["ports"] if p["port"] == store.port]
    statefulset = one("example", "StatefulSet", "wabot-redis")
    pod = statefulset["spec"]["template"]
    assert selects({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
    [redis] = pod["spec"]["containers"]
    assert container_port(redis, port["targetPort"]) == store.port
    args = redis["args"]
    assert flag(args, "--appendonly") == "yes" and flag(args, "--appendfsync") in ("always", "everysec")
    assert flag(args, "--maxmemory-policy") == "noeviction"  # never evict a journal entry
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": flag(args, "--dir")} in redis["volumeMounts"]
    [policy] = [p for p in objects("example", "NetworkPolicy") if p["metadata"]["name"] == "wabot-redis"]
    assert selects(policy["spec"]["podSelector"], pod["metadata"]["labels"])
    [rule] = policy["spec"]["ingress"]
    bot_labels = one("example", "Deployment", "wabot")["spec"]["template"]["metadata"]["labels"]
    assert [selects(peer["podSelector"], bot_labels) for peer in rule["from"]] == [True]
    assert not objects("managed-redis", "StatefulSet")


# --- monitoring ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitor_scrapes_the_metrics_port_as_the_job_the_alerts_select(overlay: str) -> None:
    rules = (ROOT / "alerts" / "wabot.rules.yml").read_text(encoding="utf-8")
    jobs = set(re.findall(r'up\{job="([^"]+)"\}', rules))
    assert len(jobs) == 1
    service = one(overlay, "Service", "wabot")
    monitor = one(overlay, "ServiceMonitor", "wabot")["spec"]
    scraped = [
        s["metadata"]["name"]
        for s in objects(overlay, "Service")
        if selects(monitor["selector"], s["metadata"]["labels"])
    ]
    assert scraped == ["wabot"]  # the collector's Service is another job
    # The operator's job label: the value of the Service's `jobLabel` label, else the Service's name.
    job = service["metadata"]["labels"][monitor["jobLabel"]] if "jobLabel" in monitor else service["metadata"]["name"]
    assert {job} == jobs
    assert service["metadata"]["name"] in jobs  # the same without jobLabel
    [endpoint] = monitor["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint.get("path", "/metrics") == "/metrics"
    assert "metrics" in {p["name"] for p in service["spec"]["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_rule_equals_the_rules_file(overlay: str) -> None:
    rule = one(overlay, "PrometheusRule", "wabot")
    assert rule["spec"] == yaml.safe_load((ROOT / "alerts" / "wabot.rules.yml").read_text(encoding="utf-8"))
    release = {o["metadata"]["labels"].get("release") for o in objects(overlay) if o["kind"] in OPERATOR_KINDS}
    assert release == {"kube-prometheus-stack"}  # one label for the stack's selectors to match


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_configmap_equals_the_dashboard_and_carries_the_sidecar_label(overlay: str) -> None:
    configmap = one(overlay, "ConfigMap", "wabot-grafana-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    text = (ROOT / "dashboards" / "wabot.json").read_text(encoding="utf-8")
    assert configmap["data"] == {"wabot.json": text}
    assert len(json.dumps(configmap)) < 262_144  # fits `kubectl apply`'s last-applied annotation


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_collector_runs_otel_collector_yaml_and_the_bot_exports_to_it(overlay: str) -> None:
    configmap = one(overlay, "ConfigMap", "wabot-otel-collector")
    source = (ROOT / "otel-collector.yaml").read_text(encoding="utf-8")
    assert configmap["data"] == {"config.yaml": source}
    deployment = one(overlay, "Deployment", "wabot-otel-collector")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    config_path = Path(container["args"][0].removeprefix("--config="))
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "wabot-otel-collector" and config_path.name == "config.yaml"
    endpoint = urlsplit(config(overlay)["OTEL_EXPORTER_OTLP_ENDPOINT"])
    service = one(overlay, "Service", endpoint.hostname)
    assert selects({"matchLabels": service["spec"]["selector"]}, deployment["spec"]["template"]["metadata"]["labels"])
    [port] = [p for p in service["spec"]["ports"] if p["port"] == endpoint.port]
    collector = yaml.safe_load(source)
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(f":{endpoint.port}")
    assert container_port(container, port["targetPort"]) == endpoint.port
    tempo_host = collector["exporters"]["otlp/tempo"]["endpoint"].split(":")[0]
    assert one(overlay, "Service", tempo_host)["spec"]["type"] == "ExternalName"


def _matcher(text: str) -> tuple[str, str, str]:
    name, op, value = re.fullmatch(r'\s*(\w+)\s*(=~|!~|!=|=)\s*"(.*)"\s*', text).groups()
    return name, op, value


def _route_as_alertmanager(route: dict[str, Any]) -> dict[str, Any]:
    """An AlertmanagerConfig route back in alertmanager.yml's terms, to compare with the file."""
    names = {"groupBy": "group_by", "groupWait": "group_wait", "groupInterval": "group_interval"}
    names |= {"repeatInterval": "repeat_interval", "receiver": "receiver", "continue": "continue"}
    out: dict[str, Any] = {names[k]: v for k, v in route.items() if k in names}
    if "matchers" in route:
        out["matchers"] = [(m["name"], m["matchType"], m["value"]) for m in route["matchers"]]
    if "routes" in route:
        out["routes"] = [_route_as_alertmanager(r) for r in route["routes"]]
    return out


def _file_route(route: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in route.items() if k not in ("matchers", "routes")}
    if "matchers" in route:
        out["matchers"] = [_matcher(m) for m in route["matchers"]]
    if "routes" in route:
        out["routes"] = [_file_route(r) for r in route["routes"]]
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_alertmanager_config_routes_as_alertmanager_yml_does(overlay: str) -> None:
    source = yaml.safe_load((ROOT / "alerts" / "alertmanager.yml").read_text(encoding="utf-8"))
    spec = one(overlay, "AlertmanagerConfig", "wabot")["spec"]
    assert _route_as_alertmanager(spec["route"]) == _file_route(source["route"])
    inhibit = [
        {
            "source": [(m["name"], m["matchType"], m["value"]) for m in r["sourceMatch"]],
            "target": [(m["name"], m["matchType"], m["value"]) for m in r["targetMatch"]],
            "equal": r["equal"],
        }
        for r in spec["inhibitRules"]
    ]
    assert inhibit == [
        {
            "source": [_matcher(m) for m in r["source_matchers"]],
            "target": [_matcher(m) for m in r["target_matchers"]],
            "equal": r["equal"],
        }
        for r in source["inhibit_rules"]
    ]
    receivers = {r["name"]: r["webhookConfigs"] for r in spec["receivers"]}
    assert receivers.keys() == {r["name"] for r in source["receivers"]}
    for receiver in source["receivers"]:
        [config_] = receivers[receiver["name"]]
        assert config_["urlSecret"] == {"name": "wabot-alert-receivers", "key": receiver["name"]}
        assert config_["sendResolved"] == receiver["webhook_configs"][0]["send_resolved"]
