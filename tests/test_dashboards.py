"""Checks of the generated Grafana dashboard (dashboards/wabot.json) and its provisioning files.

The checked-in JSON must equal the generator's output, every panel must query through the `${datasource}`
template variable, every selector must be filtered by `$job`, and every PromQL expression must parse
(checked with the real promtool, which is required: without it these tests fail, they never skip).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards import generate as gen
from telemetry.thresholds import THRESHOLDS, seconds_name
from tests.binaries import promtool

ROOT = Path(__file__).resolve().parents[1]

DASHBOARD_FILE = ROOT / "dashboards" / "wabot.json"
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}

REQUIRED_TITLES = (
    "Messages by answer path",
    "Timeout ratio",
    "Total response time p50/p95/p99",
    f"Replies over {THRESHOLDS.total_time.slow_s} s / {THRESHOLDS.total_time.twilio_limit_s} s",
    "AI processing time heatmap",
    "Follow-ups",
    "Delivery status by error code",
    "Model calls by outcome",
    "Tool calls",
    "Tokens",
    "Signature rejections",
    "Model slots",
    "Store errors",
    "SLO error budget",
    "SLO burn rate",
    "Spend per hour",
    "Spend per day against the budget",
    "Tokens per message",
    "Cost per conversation",
    "Budget refusals and cut answers",
    # top row of stats
    f"Messages ({THRESHOLDS.alerts.window})",
    f"Timeout ratio ({THRESHOLDS.alerts.window})",
    "p99 total time",
    f"AI errors ({THRESHOLDS.alerts.window})",
    "Follow-ups pending",
    "Configured deadline",
)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every non-row panel, including panels nested in collapsed rows."""
    panels = []
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            panels.append(panel)
        panels.extend(panel.get("panels") or [])
    return panels


def walk(node: Any, path: str = "$"):
    """Yield (path, key, value) for every key of every dict in a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from walk(item, f"{path}[{i}]")


def check_rules(tmp_path: Path, exprs: list[tuple[str, str]]) -> subprocess.CompletedProcess[str]:
    """Run `promtool check rules` on one recording rule per expression (one group each, named after it)."""
    groups = [
        {"name": f"{i:02d} {name}", "rules": [{"record": f"dashboard_check_{i}", "expr": expr}]}
        for i, (name, expr) in enumerate(exprs)
    ]
    rules = tmp_path / "dashboard_exprs.rules.yml"
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return subprocess.run(
        [promtool(), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60, check=False
    )


# --- generated file ------------------------------------------------------------------------------


def test_checked_in_json_equals_generator_output() -> None:
    assert DASHBOARD_FILE.read_text(encoding="utf-8") == gen.render(), (
        "dashboards/wabot.json is stale: run `python dashboards/generate.py` and commit the result"
    )


def test_check_flag_detects_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gen.main(["--check"]) == 0
    copy = tmp_path / "wabot.json"
    copy.write_text(gen.render().replace("Tokens", "Tokenz"), encoding="utf-8")
    assert gen.main(["--check", "--output", str(copy)]) == 1
    assert gen.main(["--check", "--output", str(tmp_path / "missing.json")]) == 1
    assert gen.main(["--output", str(copy)]) == 0
    assert copy.read_text(encoding="utf-8") == gen.render()
    assert gen.main(["--check", "--output", str(copy)]) == 0
    capsys.readouterr()


def test_output_is_stable() -> None:
    first = gen.render()
    assert first == gen.render()
    assert first.endswith("}\n")
    assert first == json.dumps(json.loads(first), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_only_dashboard_json_in_mounted_directory() -> None:
    # compose mounts dashboards/ as the provider's path: Grafana would load any other JSON there too.
    assert sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "dashboards").rglob("*.json")) == [
        "dashboards/wabot.json"
    ]


# --- dashboard settings --------------------------------------------------------------------------


def test_dashboard_settings(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "wabot-overview"
    assert dashboard["title"] == "wabot — WhatsApp AI bot"
    assert dashboard["tags"] == ["wabot"]
    assert dashboard["refresh"] == "30s"
    assert dashboard["time"] == {"from": "now-6h", "to": "now"}
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["annotations"] == {"list": []}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and 0 not in ids
    # Current panel types only: no legacy graph/singlestat panels.
    assert {p["type"] for p in dashboard["panels"]} <= {"row", "stat", "timeseries", "heatmap"}


def test_template_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "job"]
    ds = variables["datasource"]
    assert ds["type"] == "datasource"
    assert ds["query"] == "prometheus"
    assert "current" not in ds, "the datasource variable must not pin a datasource uid"
    job = variables["job"]
    assert job["type"] == "query"
    assert job["query"] == "label_values(wabot_build_info, job)"
    assert job["datasource"] == DATASOURCE_REF
    assert job["includeAll"] is True
    assert job["allValue"] == ".*"


def test_every_panel_uses_datasource_variable(dashboard: dict[str, Any]) -> None:
    panels = query_panels(dashboard)
    assert panels
    for panel in panels:
        assert panel["datasource"] == DATASOURCE_REF, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for t in panel["targets"]:
            assert t["datasource"] == DATASOURCE_REF, (panel["title"], t["refId"])
            assert t["expr"].strip(), (panel["title"], t["refId"])
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)) and all(ref_ids), (panel["title"], ref_ids)


def test_no_hard_coded_uid(dashboard: dict[str, Any]) -> None:
    for path, key, value in walk(dashboard):
        if path == "$" and key == "uid":
            continue  # the dashboard's own uid
        if key == "uid":
            assert value == "${datasource}", f"hard-coded uid {value!r} at {path}"
        if key == "datasource" and path != "$":
            assert value == DATASOURCE_REF, f"datasource {value!r} at {path}"


def test_required_titles_exist(dashboard: dict[str, Any]) -> None:
    titles = [p["title"] for p in query_panels(dashboard)]
    missing = [t for t in REQUIRED_TITLES if t not in titles]
    assert not missing, f"panels missing (runbooks refer to these titles): {missing}"
    duplicates = {t for t in titles if titles.count(t) > 1}
    assert not duplicates, f"duplicate panel titles: {duplicates}"


def panel(dashboard: dict[str, Any], title: str) -> dict[str, Any]:
    (found,) = [p for p in query_panels(dashboard) if p["title"] == title]
    return found


def test_answer_path_panel(dashboard: dict[str, Any]) -> None:
    messages = panel(dashboard, "Messages by answer path")
    assert messages["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    legends = {t["legendFormat"]: t["expr"] for t in messages["targets"]}
    assert list(legends) == ["inline", "holding + follow-up", "error", "busy"]
    for legend, outcome in zip(legends, ("ok", "timeout", "error", "busy"), strict=True):
        assert legends[legend] == (
            f'sum(rate(wabot_ai_runs_total{{job=~"$job",outcome="{outcome}"}}[$__rate_interval]))'
        )


def thresholds(panel: dict[str, Any]) -> list[float]:
    return [s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"] if s["value"] is not None]


def test_threshold_panels(dashboard: dict[str, Any]) -> None:
    # The values of the lines are checked against telemetry/thresholds.py in tests/test_thresholds.py.
    ratio = panel(dashboard, "Timeout ratio")
    assert thresholds(ratio) == [THRESHOLDS.alerts.timeout_ratio]
    assert ratio["fieldConfig"]["defaults"]["unit"] == "percentunit"
    response = panel(dashboard, "Total response time p50/p95/p99")
    assert thresholds(response) == [THRESHOLDS.total_time.slow_s, THRESHOLDS.total_time.twilio_limit_s]
    assert response["fieldConfig"]["defaults"]["unit"] == "s"
    exprs = [t["expr"] for t in response["targets"]]
    assert any("wabot_reply_timeout_seconds" in e for e in exprs)
    for q in ("p50", "p95", "p99"):
        assert any(f"wabot:response_seconds:{q}_{THRESHOLDS.alerts.window}" in e for e in exprs), q
    burn = panel(dashboard, "SLO burn rate")
    assert thresholds(burn) == sorted(b.factor for b in THRESHOLDS.slo.burn_rates)
    reply_slo = f"slo_reply_{seconds_name(THRESHOLDS.total_time.twilio_limit_s)}"
    for stem in (reply_slo, "slo_answer_delivered"):
        for window in THRESHOLDS.slo.long_windows:
            assert any(f"wabot:{stem}:error_ratio_rate{window}" in t["expr"] for t in burn["targets"])
    for p in (response, ratio, burn):
        assert p["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] != "off", p["title"]


def test_slo_budget_uses_the_thresholds_targets(dashboard: dict[str, Any]) -> None:
    budget = panel(dashboard, "SLO error budget")
    assert budget["type"] == "stat"
    assert budget["fieldConfig"]["defaults"]["unit"] == "percentunit"
    exprs = [t["expr"] for t in budget["targets"]]
    slo, longest = THRESHOLDS.slo, THRESHOLDS.slo.windows[-1]
    reply_slo = f"slo_reply_{seconds_name(THRESHOLDS.total_time.twilio_limit_s)}"
    assert exprs == [
        f'1 - (max(wabot:{stem}:error_ratio_rate{longest}{{job=~"$job"}}) / (1 - {target}))'
        for stem, target in ((reply_slo, slo.reply_target), ("slo_answer_delivered", slo.delivered_target))
    ]


def test_exemplars_on_latency_histograms(dashboard: dict[str, Any]) -> None:
    heat = panel(dashboard, "AI processing time heatmap")
    assert heat["type"] == "heatmap"
    (t,) = heat["targets"]
    assert t["format"] == "heatmap"
    assert t["exemplar"] is True
    assert t["expr"] == ('sum by (le) (increase(wabot_ai_processing_seconds_bucket{job=~"$job"}[$__rate_interval]))')
    assert heat["options"]["calculate"] is False
    followup_latency = [
        t for p in query_panels(dashboard) for t in p["targets"] if "wabot_followup_seconds_bucket" in t["expr"]
    ]
    assert followup_latency and all(t.get("exemplar") is True for t in followup_latency)


# --- PromQL --------------------------------------------------------------------------------------

METRIC = re.compile(r"\b(wabot[a-z0-9_:]*)(\{[^}]*\})?")


def test_every_selector_filters_job(dashboard: dict[str, Any]) -> None:
    for p in query_panels(dashboard):
        for t in p["targets"]:
            selectors = METRIC.findall(t["expr"])
            assert selectors, (p["title"], t["expr"])
            for name, matchers in selectors:
                assert 'job=~"$job"' in matchers, f'{p["title"]}: selector {name}{matchers} lacks job=~"$job"'


@pytest.mark.prometheus
def test_every_expr_parses_with_promtool(dashboard: dict[str, Any], tmp_path: Path) -> None:
    exprs = [
        (f"{p['title']} {t['refId']}", gen.substitute(t["expr"])) for p in query_panels(dashboard) for t in p["targets"]
    ]
    result = check_rules(tmp_path, exprs)
    assert result.returncode == 0, f"promtool rejected dashboard PromQL:\n{result.stdout}\n{result.stderr}"
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout, result.stdout


@pytest.mark.prometheus
def test_promtool_harness_rejects_bad_promql(tmp_path: Path) -> None:
    # Guards the check above: a broken expression must make promtool fail and name it.
    result = check_rules(tmp_path, [("Broken panel A", "sum(rate(wabot_tokens_total[1m])")])
    assert result.returncode != 0
    assert "Broken panel A" in result.stdout + result.stderr


# --- panel_queries() contract --------------------------------------------------------------------


def test_panel_queries_cover_every_target(dashboard: dict[str, Any]) -> None:
    queries = gen.panel_queries()
    expected = [(p["title"], gen.substitute(t["expr"])) for p in query_panels(dashboard) for t in p["targets"]]
    assert queries == expected
    assert {title for title, _ in queries} == {p["title"] for p in query_panels(dashboard)}
    for title, expr in queries:
        assert "$" not in expr, (title, expr)
        assert f'job=~"{THRESHOLDS.job}"' in expr, (title, expr)


def test_substitute() -> None:
    job = THRESHOLDS.job
    assert gen.substitute('rate(x{job=~"$job"}[$__rate_interval])') == f'rate(x{{job=~"{job}"}}[1m])'
    assert gen.substitute('x{job=~"${job}"}') == f'x{{job=~"{job}"}}'
    with pytest.raises(KeyError, match="unknown_var"):
        gen.substitute("x[$unknown_var]")


# --- provisioning --------------------------------------------------------------------------------


def test_datasource_provisioning() -> None:
    config = yaml.safe_load((ROOT / "dashboards/provisioning/datasources/wabot.yml").read_text(encoding="utf-8"))
    assert config["apiVersion"] == 1
    by_uid = {d["uid"]: d for d in config["datasources"]}
    prom, tempo = by_uid["prometheus"], by_uid["tempo"]
    assert (prom["type"], prom["url"]) == ("prometheus", "http://prometheus:9090")
    assert prom["jsonData"]["exemplarTraceIdDestinations"] == [{"name": "trace_id", "datasourceUid": "tempo"}]
    assert (tempo["type"], tempo["url"]) == ("tempo", "http://tempo:3200")
    assert [d["name"] for d in config["datasources"] if d.get("isDefault")] == ["Prometheus"]


def test_dashboard_provisioning() -> None:
    config = yaml.safe_load((ROOT / "dashboards/provisioning/dashboards/wabot.yml").read_text(encoding="utf-8"))
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


# --- media and typing indicator row (#14) --------------------------------------------------------------------

MEDIA_ROW = "Media and typing indicator"


def row_panels(dashboard: dict[str, Any], row: str) -> list[dict[str, Any]]:
    """The panels under the row titled `row`, up to the next row."""
    panels, inside = [], False
    for p in dashboard["panels"]:
        if p["type"] == "row":
            inside = p["title"] == row
        elif inside:
            panels.append(p)
    return panels


def test_media_row_draws_the_alert_lines(dashboard: dict[str, Any]) -> None:
    m, w = THRESHOLDS.media, THRESHOLDS.alerts.window
    titles = [p["title"] for p in row_panels(dashboard, MEDIA_ROW)]
    assert titles == [
        "Attachments by kind and outcome",
        "Attachment failure share",
        "Media download and transcription p50/p95",
        "Typing indicators",
        "Typing indicator p50/p95 (arrival → accepted)",
    ]
    share = panel(dashboard, "Attachment failure share")
    assert thresholds(share) == [m.failure_ratio]
    assert [t["expr"] for t in share["targets"]] == [f'max(wabot:media_failure:ratio_rate{w}{{job=~"$job"}})']
    first = panel(dashboard, "Typing indicator p50/p95 (arrival → accepted)")
    assert thresholds(first) == [m.typing_line_s]
    assert first["fieldConfig"]["defaults"]["unit"] == "s"
    for p in (share, first):
        assert p["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "dashed", p["title"]
    assert f"above {m.typing_failure_ratio:.0%}" in panel(dashboard, "Typing indicators")["description"]


# Per 15 s: voice notes 2 transcribed and 1 failed, photos 3 read and 1 whose download failed, 1 PDF over the cap,
# 2 videos; 7 downloads (4 within 0.25 s, 2 more within 0.5 s, 1 more within 2 s); 3 transcriptions (2 within 2 s,
# 1 between 4 and 6 s); typing indicators 9 sent (all accepted within 0.25-0.5 s) and 1 failed.
MEDIA_TRAFFIC = {
    'wabot_media_total{kind="audio",outcome="ok"}': 2,
    'wabot_media_total{kind="audio",outcome="transcribe_error"}': 1,
    'wabot_media_total{kind="image",outcome="ok"}': 3,
    'wabot_media_total{kind="image",outcome="fetch_error"}': 1,
    'wabot_media_total{kind="document",outcome="too_large"}': 1,
    'wabot_media_total{kind="other",outcome="unsupported"}': 2,
    'wabot_media_fetch_seconds_bucket{le="0.25"}': 4,
    'wabot_media_fetch_seconds_bucket{le="0.5"}': 6,
    'wabot_media_fetch_seconds_bucket{le="2.0"}': 7,
    'wabot_media_fetch_seconds_bucket{le="+Inf"}': 7,
    "wabot_media_fetch_seconds_count": 7,
    'wabot_transcription_seconds_bucket{le="2.0"}': 2,
    'wabot_transcription_seconds_bucket{le="4.0"}': 2,
    'wabot_transcription_seconds_bucket{le="6.0"}': 3,
    'wabot_transcription_seconds_bucket{le="+Inf"}': 3,
    "wabot_transcription_seconds_count": 3,
    'wabot_typing_indicators_total{outcome="sent"}': 9,
    'wabot_typing_indicators_total{outcome="failed"}': 1,
    'wabot_typing_indicator_seconds_bucket{le="0.25"}': 0,
    'wabot_typing_indicator_seconds_bucket{le="0.5"}': 9,
    'wabot_typing_indicator_seconds_bucket{le="+Inf"}': 9,
    "wabot_typing_indicator_seconds_count": 9,
}
# What each query of the row shows for that traffic: {labels: value} per (panel, refId).
MEDIA_EXPECTED = {
    ("Attachments by kind and outcome", "A"): {
        '{kind="audio",outcome="ok"}': 2 / 15,
        '{kind="audio",outcome="transcribe_error"}': 1 / 15,
        '{kind="image",outcome="ok"}': 3 / 15,
        '{kind="image",outcome="fetch_error"}': 1 / 15,
        '{kind="document",outcome="too_large"}': 1 / 15,
        '{kind="other",outcome="unsupported"}': 2 / 15,
    },
    ("Attachment failure share", "A"): {"{}": 2 / 7},
    # Quantiles interpolate within a bucket: rank 17.5 of 35 in 0-0.25 s, 33.25 in 0.5-2 s; 7.5 of 15 in 0-2 s,
    # 14.25 in 4-6 s; 22.5 and 42.75 of 45 in 0.25-0.5 s.
    ("Media download and transcription p50/p95", "A"): {"{}": 0.21875},
    ("Media download and transcription p50/p95", "B"): {"{}": 1.475},
    ("Media download and transcription p50/p95", "C"): {"{}": 1.5},
    ("Media download and transcription p50/p95", "D"): {"{}": 5.7},
    ("Typing indicators", "A"): {'{outcome="sent"}': 9 / 15, '{outcome="failed"}': 1 / 15},
    ("Typing indicators", "B"): {"{}": 0.1},
    ("Typing indicator p50/p95 (arrival → accepted)", "A"): {"{}": 0.375},
    ("Typing indicator p50/p95 (arrival → accepted)", "B"): {"{}": 0.4875},
}


def _with_job(series: str) -> str:
    labels = f'job="{THRESHOLDS.job}",instance="wabot:9464"'
    name, _, rest = series.partition("{")
    return f"{name}{{{labels}{',' + rest if rest else '}'}"


@pytest.mark.prometheus
def test_media_row_queries_show_the_traffic_in_prometheus(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Every query of the row, through the real rules file and Prometheus's query engine (promtool's rule tests),
    shows exactly the attachments and indicators of a known traffic."""
    rules = ROOT / "alerts" / "wabot.rules.yml"
    order = [group["name"] for group in yaml.safe_load(rules.read_text(encoding="utf-8"))["groups"]]
    checks, unchecked = [], dict(MEDIA_EXPECTED)
    for p in row_panels(dashboard, MEDIA_ROW):
        for t in p["targets"]:
            expected = unchecked.pop((p["title"], t["refId"]))
            checks.append(
                {
                    "expr": f"round(({gen.substitute(t['expr'])}) * 1e6) / 1e6",
                    "eval_time": "10m",
                    "exp_samples": [{"labels": k, "value": round(v, 6)} for k, v in expected.items()],
                }
            )
    assert unchecked == {}, "expected values for queries the row does not have"
    spec = {
        "rule_files": [str(rules)],
        "evaluation_interval": "15s",
        "group_eval_order": order,
        "tests": [
            {
                "name": "media row",
                "interval": "15s",
                "input_series": [
                    {"series": _with_job(series), "values": f"0+{step}x60"} for series, step in MEDIA_TRAFFIC.items()
                ],
                "promql_expr_test": checks,
            }
        ],
    }
    path = tmp_path / "media_row.test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
    result = subprocess.run(
        [promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
