"""Build the wabot Grafana dashboard from code and write it to dashboards/wabot.json.

The dashboard is defined here with grafana-foundation-sdk; wabot.json is a generated, checked-in artifact. Every
threshold line, SLO target, window and burn factor comes from telemetry/thresholds.py (the alert rules read the
same numbers); each builder takes them as `t`, so a test can build the dashboard of other thresholds.

    python dashboards/generate.py           # (re)write dashboards/wabot.json
    python dashboards/generate.py --check   # exit 1 if wabot.json differs from what this module builds

Every panel and query uses the `${datasource}` template variable (no hard-coded datasource uid) and every
selector is filtered by `job=~"$job"`. `panel_queries()` lists every query with the template variables
replaced by simple defaults, so an end-to-end test can run each one against a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import heatmap as heatmap_b
from grafana_foundation_sdk.builders import prometheus as prom_b
from grafana_foundation_sdk.builders import stat as stat_b
from grafana_foundation_sdk.builders import timeseries as ts_b
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dash_m
from grafana_foundation_sdk.models import heatmap as heatmap_m
from grafana_foundation_sdk.models import prometheus as prom_m

from telemetry.thresholds import THRESHOLDS, Thresholds, duration_seconds, duration_words, seconds_name

DASHBOARD_UID = "wabot-overview"
DASHBOARD_TITLE = "wabot — WhatsApp AI bot"
OUTPUT = Path(__file__).resolve().with_name("wabot.json")

GRID_COLUMNS = 24  # Grafana's dashboard grid: a panel's span is out of 24
DATASOURCE = dash_m.DataSourceRef(type_val="prometheus", uid="${datasource}")
JOB = 'job=~"$job"'
RATE = "$__rate_interval"

# What panel_queries() substitutes for each template variable.
QUERY_DEFAULTS = {"__rate_interval": "1m", "job": THRESHOLDS.job}

# Burn-rate line colours, lowest factor first.
BURN_COLOURS = ("yellow", "orange", "red", "dark-red")


def slos(t: Thresholds) -> tuple[tuple[str, str, float], ...]:
    """SLIs: (recording-rule stem, short legend, target), named as alerts/generate.py names them."""
    limit = t.total_time.twilio_limit_s
    return (
        (f"wabot:slo_reply_{seconds_name(limit)}", f"reply ≤ {limit} s", t.slo.reply_target),
        ("wabot:slo_answer_delivered", "answer delivered", t.slo.delivered_target),
    )


def _spaced(duration: str) -> str:
    """A duration as the panel texts write it: "3d" -> "3 d"."""
    return f"{duration[:-1]} {duration[-1]}"


# --- PromQL helpers ------------------------------------------------------------------------------


def sel(metric: str, *matchers: str) -> str:
    """A selector for `metric` filtered by the job variable plus `matchers`."""
    return metric + "{" + ",".join((JOB, *matchers)) + "}"


def rate(metric: str, *matchers: str, window: str = RATE) -> str:
    return f"rate({sel(metric, *matchers)}[{window}])"


def increase(metric: str, *matchers: str, window: str = RATE) -> str:
    return f"increase({sel(metric, *matchers)}[{window}])"


def error_budget_factor(target: float) -> str:
    return f"(1 - {target})"


# --- builder helpers -----------------------------------------------------------------------------


def target(ref_id: str, expr: str, legend: str, *, exemplar: bool = False) -> prom_b.Dataquery:
    query = (
        prom_b.Dataquery()
        .ref_id(ref_id)
        .datasource(DATASOURCE)
        .expr(expr)
        .legend_format(legend)
        .range()
        .editor_mode(prom_m.QueryEditorMode.CODE)
    )
    if exemplar:
        query = query.exemplar(True)
    return query


def thresholds(base: str, *steps: tuple[float, str]) -> dash_b.ThresholdsConfig:
    return (
        dash_b.ThresholdsConfig()
        .mode(dash_m.ThresholdsMode.ABSOLUTE)
        .steps(
            [
                dash_m.Threshold(value=None, color=base),
                *(dash_m.Threshold(value=v, color=c) for v, c in steps),
            ]
        )
    )


def fixed_color(color: str) -> dash_m.DynamicConfigValue:
    return dash_m.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color})


DASHED = dash_m.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]})


def timeseries(
    title: str, description: str, unit: str, *, span: int = GRID_COLUMNS // 2, height: int = 8
) -> ts_b.Panel:
    return (
        ts_b.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(span)
        .height(height)
        .line_width(1)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
        .legend(
            common_b.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
        )
        .tooltip(common_b.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING))
    )


def threshold_lines(panel: ts_b.Panel) -> ts_b.Panel:
    return panel.thresholds_style(common_b.GraphThresholdsStyleConfig().mode(common.GraphTresholdsStyleMode.DASHED))


def stat(title: str, description: str, unit: str, *, span: int = 4, height: int = 4) -> stat_b.Panel:
    return (
        stat_b.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(span)
        .height(height)
        .graph_mode(common.BigValueGraphMode.AREA)
        .color_mode(common.BigValueColorMode.VALUE)
        .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )


# --- panels --------------------------------------------------------------------------------------


def overview_stats(t: Thresholds) -> list[stat_b.Panel]:
    w, slow, limit = t.alerts.window, t.total_time.slow_s, t.total_time.twilio_limit_s
    return [
        stat(f"Messages ({w})", f"Inbound messages that started an AI run in the last {duration_words(w)}.", "short")
        .with_target(target("A", f"sum({increase('wabot_ai_runs_total', window=w)})", "messages"))
        .decimals(0)
        .thresholds(thresholds("blue")),
        stat(
            f"Timeout ratio ({w})",
            "Share of messages answered by a holding reply + follow-up (worst selected job).",
            "percentunit",
        )
        .with_target(target("A", f"max({sel(f'wabot:ai_timeout:ratio_rate{w}')})", "timeout ratio"))
        .thresholds(thresholds("green", (t.alerts.timeout_ratio, "red"))),
        stat("p99 total time", f"Webhook total time p99 over {w} (worst selected job).", "s")
        .with_target(target("A", f"max({sel(f'wabot:response_seconds:p99_{w}')})", "p99"))
        .thresholds(thresholds("green", (slow, "orange"), (limit, "red"))),
        stat(
            f"AI errors ({w})",
            f"AI runs that ended with an apology instead of an answer (inline or follow-up), last {duration_words(w)}.",
            "short",
        )
        .with_target(target("A", f"sum({increase('wabot_ai_errors_total', window=w)}) or vector(0)", "errors"))
        .decimals(0)
        .thresholds(thresholds("green", (1, "red"))),  # any error: a user got an apology
        stat("Follow-ups pending", "Holding replies whose real answer has not been delivered yet.", "short")
        .with_target(target("A", f"sum({sel('wabot_followups_pending')})", "pending"))
        .thresholds(thresholds("green", (t.dashboard.followups_pending, "orange"))),
        stat(
            "Configured deadline",
            "WABOT_REPLY_TIMEOUT: past it the user gets a holding reply and the answer follows later.",
            "s",
        )
        .with_target(target("A", f"max({sel('wabot_reply_timeout_seconds')})", "deadline"))
        .thresholds(thresholds("blue", (slow, "red"))),
    ]


def slo_panels(t: Thresholds) -> list[Any]:
    longest = t.slo.windows[-1]
    budget = (
        stat(
            "SLO error budget",
            f"Error budget left, approximating the {_spaced(t.slo.period)} window with the {_spaced(longest)} "
            f"error ratio: 1 - error_ratio_{longest} / (1 - target). Below 0 the budget is spent.",
            "percentunit",
            span=8,
            height=8,
        )
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .graph_mode(common.BigValueGraphMode.NONE)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .thresholds(thresholds("red", (0, "orange"), (t.dashboard.budget_left, "green")))
    )
    for ref, (stem, name, slo) in zip("AB", slos(t), strict=True):
        expr = f"1 - (max({sel(f'{stem}:error_ratio_rate{longest}')}) / {error_budget_factor(slo)})"
        budget = budget.with_target(target(ref, expr, f"{name} ({slo * 100:g} %)"))

    def when(severity: str) -> str:
        return " or ".join(f"{b.long} > {b.factor:g}" for b in t.slo.burn_rates if b.severity == severity)

    factors = sorted({b.factor for b in t.slo.burn_rates})
    burn = threshold_lines(
        timeseries(
            "SLO burn rate",
            f"Error ratio / (1 - target) per window. Pages when {when('critical')} (with their short "
            f"windows), tickets when {when('warning')}.",
            "short",
            span=16,
        )
    ).thresholds(
        thresholds(
            "green",
            *((f, BURN_COLOURS[min(i, len(BURN_COLOURS) - 1)]) for i, f in enumerate(factors)),
        )
    )
    refs = iter(string.ascii_uppercase)
    for stem, name, slo in slos(t):
        for window in t.slo.long_windows:
            expr = f"max({sel(f'{stem}:error_ratio_rate{window}')}) / {error_budget_factor(slo)}"
            burn = burn.with_target(target(next(refs), expr, f"{name} {window}"))
    burn = burn.legend(
        common_b.VizLegendOptions()
        .show_legend(True)
        .display_mode(common.LegendDisplayMode.TABLE)
        .placement(common.LegendPlacement.RIGHT)
        .calcs(["lastNotNull", "max"])
    )
    return [budget, burn]


def answer_path_panels(t: Thresholds) -> list[Any]:
    w, slow, limit, line = t.alerts.window, t.total_time.slow_s, t.total_time.twilio_limit_s, t.alerts.timeout_ratio
    reply_slo = t.slo.reply_target

    def runs(outcome: str) -> str:
        matcher = f'outcome="{outcome}"'
        return f"sum({rate('wabot_ai_runs_total', matcher)})"

    messages = (
        timeseries(
            "Messages by answer path",
            "inline: answered before the deadline; holding + follow-up: deadline hit, answer sent later "
            "through the REST API; error: failed before the deadline (apology); busy: every model slot "
            "taken, busy holding reply at once, answer sent later.",
            "short",
        )
        .axis_label("messages/s")
        .stacking(common_b.StackingConfig().mode(common.StackingMode.NORMAL))
        .fill_opacity(60)
        .with_target(target("A", runs("ok"), "inline"))
        .with_target(target("B", runs("timeout"), "holding + follow-up"))
        .with_target(target("C", runs("error"), "error"))
        .with_target(target("D", runs("busy"), "busy"))
        .override_by_name("inline", [fixed_color("green")])
        .override_by_name("holding + follow-up", [fixed_color("orange")])
        .override_by_name("error", [fixed_color("red")])
        .override_by_name("busy", [fixed_color("purple")])
    )
    timeout_ratio = (
        threshold_lines(
            timeseries(
                "Timeout ratio",
                f"Share of messages that hit the deadline. Above {line:.0%} the model or a "
                "tool is slow: check model calls, tool calls and the heatmap.",
                "percentunit",
            )
        )
        .min(0)
        .axis_soft_max(line * 1.25)
        .thresholds(thresholds("green", (line, "red")))
        .with_target(target("A", f"max({sel(f'wabot:ai_timeout:ratio_rate{w}')})", "timeout ratio"))
    )
    response = (
        threshold_lines(
            timeseries(
                "Total response time p50/p95/p99",
                f"Webhook total time (arrival to TwiML sent), {w} quantiles from buckets. Dashed lines: "
                f"{slow} s (slow) and {limit} s (Twilio drops the reply); "
                "dashed series: the configured deadline.",
                "s",
            )
        )
        .min(0)
        .axis_soft_max(limit + 1)
        .thresholds(thresholds("green", (slow, "orange"), (limit, "red")))
        .with_target(target("A", f"max({sel(f'wabot:response_seconds:p50_{w}')})", "p50"))
        .with_target(target("B", f"max({sel(f'wabot:response_seconds:p95_{w}')})", "p95"))
        .with_target(target("C", f"max({sel(f'wabot:response_seconds:p99_{w}')})", "p99"))
        .with_target(target("D", f"max({sel('wabot_reply_timeout_seconds')})", "deadline (configured)"))
        .override_by_query("D", [DASHED, fixed_color("blue")])
    )
    over_lines = (
        threshold_lines(
            timeseries(
                f"Replies over {slow} s / {limit} s",
                f"Share of webhook replies slower than {slow} s and {limit} s (exact, from bucket edges). Dashed "
                f"line: the error rate the {reply_slo:.1%} reply SLO allows.",
                "percentunit",
            )
        )
        .min(0)
        .thresholds(thresholds("green", (round(1 - reply_slo, 6), "red")))
        .with_target(
            target("A", f"max({sel(f'wabot:response_over_{seconds_name(slow)}:ratio_rate{w}')})", f"over {slow} s")
        )
        .with_target(
            target("B", f"max({sel(f'wabot:response_over_{seconds_name(limit)}:ratio_rate{w}')})", f"over {limit} s")
        )
        .override_by_name(f"over {slow} s", [fixed_color("orange")])
        .override_by_name(f"over {limit} s", [fixed_color("red")])
    )
    heat = (
        heatmap_b.Panel()
        .title("AI processing time heatmap")
        .description(
            "AI run time until the answer (or until the deadline for runs that timed out). "
            "Exemplars (dots) link to the run's trace in Tempo."
        )
        .datasource(DATASOURCE)
        .span(24)
        .height(9)
        .calculate(False)
        .rows_frame(heatmap_b.RowsHeatmapOptions().layout(common.HeatmapCellLayout.LE))
        .y_axis(heatmap_b.YAxisConfig().unit("s"))
        .cell_values(heatmap_b.CellValues().unit("short"))
        .color(
            heatmap_b.HeatmapColorOptions()
            .mode(heatmap_m.HeatmapColorMode.SCHEME)
            .scheme("Oranges")
            .fill("dark-orange")
            .scale(heatmap_m.HeatmapColorScale.EXPONENTIAL)
            .exponent(0.5)
            .steps(64)
        )
        .show_legend()
        .show_tooltip()
        .show_y_histogram()
        .exemplars_color("rgba(255,0,255,0.7)")
        .with_target(
            target(
                "A",
                f"sum by (le) ({increase('wabot_ai_processing_seconds_bucket')})",
                "{{le}}",
                exemplar=True,
            ).format(prom_m.PromQueryFormat.HEATMAP)
        )
    )
    return [messages, timeout_ratio, response, over_lines, heat]


def followup_panels(t: Thresholds) -> list[Any]:
    followups = (
        timeseries(
            "Follow-ups",
            "Follow-up deliveries per second by outcome, follow-ups still pending, and the share delivered "
            "(right axis).",
            "short",
        )
        .with_target(target("A", f"sum by (outcome) ({rate('wabot_followups_total')})", "{{outcome}}/s"))
        .with_target(target("B", f"sum({sel('wabot_followups_pending')})", "pending"))
        .with_target(
            target("C", f"max({sel(f'wabot:followup_delivery:ratio_rate{t.alerts.window}')})", "delivered ratio")
        )
        .override_by_query(
            "C",
            [
                dash_m.DynamicConfigValue(id_val="unit", value="percentunit"),
                dash_m.DynamicConfigValue(id_val="min", value=0),
                dash_m.DynamicConfigValue(id_val="max", value=1),
                dash_m.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
                DASHED,
            ],
        )
    )
    latency = (
        timeseries(
            "Follow-up latency p95",
            "Inbound message arrival until its follow-up was accepted by Twilio, p95 over the rate interval. "
            "Exemplars link to traces.",
            "s",
        )
        .min(0)
        .with_target(
            target(
                "A",
                f"histogram_quantile(0.95, sum by (le) ({rate('wabot_followup_seconds_bucket')}))",
                "p95",
                exemplar=True,
            )
        )
    )
    status = (
        timeseries(
            "Delivery status by error code",
            "Twilio status callbacks for outbound messages by status and Twilio error code "
            "(e.g. 63016 = outside the 24 h session window).",
            "short",
        )
        .axis_label("callbacks/s")
        .with_target(
            target(
                "A",
                f"sum by (status, error_code) ({rate('wabot_message_status_total')})",
                "{{status}} {{error_code}}",
            )
        )
    )
    rejections = (
        timeseries(
            "Signature rejections",
            "Webhook requests not processed, by reason (signature = X-Twilio-Signature did not verify).",
            "short",
        )
        .axis_label("requests/s")
        .with_target(target("A", f"sum by (reason) ({rate('wabot_webhook_rejections_total')})", "{{reason}}"))
        .override_by_name("signature", [fixed_color("red")])
    )
    store_errors = (
        timeseries(
            "Store errors",
            "Failed store operations per second by operation (SQLite locked or full, Redis unreachable). The bot "
            "keeps answering without dedupe and journal meanwhile: see the WabotStoreErrors runbook.",
            "short",
            span=24,
            height=6,
        )
        .axis_label("errors/s")
        .with_target(target("A", f"sum by (op) ({rate('wabot_store_errors_total')})", "{{op}}"))
    )
    return [followups, latency, status, rejections, store_errors]


def model_panels() -> list[Any]:
    model_calls = (
        timeseries("Model calls by outcome", "Calls to the model API per second by outcome.", "short", span=6)
        .axis_label("calls/s")
        .with_target(target("A", f"sum by (outcome) ({rate('wabot_model_calls_total')})", "{{outcome}}"))
        .override_by_name("ok", [fixed_color("green")])
    )
    tool_calls = (
        timeseries("Tool calls", "Function tool executions per second by tool and outcome.", "short", span=6)
        .axis_label("calls/s")
        .with_target(target("A", f"sum by (tool, outcome) ({rate('wabot_tool_calls_total')})", "{{tool}} {{outcome}}"))
    )
    tokens = (
        timeseries(
            "Tokens",
            "Model tokens per second by direction (cached_input: the part of input served from the prompt cache).",
            "short",
            span=6,
        )
        .axis_label("tokens/s")
        .with_target(target("A", f"sum by (direction) ({rate('wabot_tokens_total')})", "{{direction}}"))
    )
    slots = (
        timeseries(
            "Model slots",
            "AI runs holding a model slot and runs queued for one, against the cap (WABOT_MAX_CONCURRENT_RUNS, "
            "summed over instances). Queued runs mean users got the busy holding reply.",
            "short",
            span=6,
        )
        .min(0)
        .with_target(target("A", f"sum({sel('wabot_runs_active')})", "active"))
        .with_target(target("B", f"sum({sel('wabot_runs_queued')})", "queued"))
        .with_target(target("C", f"sum({sel('wabot_max_concurrent_runs')})", "cap"))
        .override_by_name("queued", [fixed_color("purple")])
        .override_by_name("cap", [fixed_color("red")])
    )
    return [model_calls, tool_calls, tokens, slots]


def media_panels(t: Thresholds) -> list[Any]:
    """Attachments (#14): what became of them, how long downloads and transcriptions take, the failure share the
    WabotMediaFailing alert reads; the typing indicator: sent and failed, and how soon after arrival."""
    w, m = t.alerts.window, t.media
    attachments = (
        timeseries(
            "Attachments by kind and outcome",
            "Attachments (MediaUrl{i}) per second by kind and outcome. fetch_error and transcribe_error are the "
            "bot's or a vendor's (Twilio media, OpenAI transcription); too_large and unsupported are the sender's, "
            "who is told so.",
            "short",
            span=8,
        )
        .axis_label("attachments/s")
        .with_target(target("A", f"sum by (kind, outcome) ({rate('wabot_media_total')})", "{{kind}} {{outcome}}"))
    )
    failure = (
        threshold_lines(
            timeseries(
                "Attachment failure share",
                f"Share of the attachments the bot tried to read ({', '.join(m.read_outcomes)}) that failed "
                f"({', '.join(m.failure_outcomes)}), over {w}. Dashed line: WabotMediaFailing "
                f"(with at least {m.min_attachments} attachments).",
                "percentunit",
                span=8,
            )
        )
        .min(0)
        .axis_soft_max(m.failure_ratio * 1.25)
        .thresholds(thresholds("green", (m.failure_ratio, "red")))
        .with_target(target("A", f"max({sel(f'wabot:media_failure:ratio_rate{w}')})", "failure share"))
    )
    latency = (
        timeseries(
            "Media download and transcription p50/p95",
            f"Download of one attachment from Twilio (redirects included) and transcription of one voice note, "
            f"{w} quantiles from buckets, failed attempts included. Both count against the reply deadline.",
            "s",
            span=8,
        )
        .min(0)
        .with_target(target("A", f"max({sel(f'wabot:media_fetch_seconds:p50_{w}')})", "download p50"))
        .with_target(target("B", f"max({sel(f'wabot:media_fetch_seconds:p95_{w}')})", "download p95"))
        .with_target(target("C", f"max({sel(f'wabot:transcription_seconds:p50_{w}')})", "transcription p50"))
        .with_target(target("D", f"max({sel(f'wabot:transcription_seconds:p95_{w}')})", "transcription p95"))
    )
    typing = (
        timeseries(
            "Typing indicators",
            "WhatsApp typing indicators per second by outcome (refreshes during long follow-ups included), and the "
            f"failed share over {w} (right axis; WabotTypingIndicatorsFailing above {m.typing_failure_ratio:.0%}). "
            "A failure never changes the reply.",
            "short",
        )
        .axis_label("indicators/s")
        .with_target(target("A", f"sum by (outcome) ({rate('wabot_typing_indicators_total')})", "{{outcome}}"))
        .with_target(target("B", f"max({sel(f'wabot:typing_indicator_failure:ratio_rate{w}')})", "failed share"))
        .override_by_name("sent", [fixed_color("green")])
        .override_by_name("failed", [fixed_color("red")])
        .override_by_query(
            "B",
            [
                dash_m.DynamicConfigValue(id_val="unit", value="percentunit"),
                dash_m.DynamicConfigValue(id_val="min", value=0),
                dash_m.DynamicConfigValue(id_val="max", value=1),
                dash_m.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
                DASHED,
            ],
        )
    )
    first = (
        threshold_lines(
            timeseries(
                "Typing indicator p50/p95 (arrival → accepted)",
                f"Inbound message arrival until Twilio accepted its first typing indicator, {w} quantiles. Dashed "
                f'line: the {m.typing_line_s} s within which the user should see "typing…".',
                "s",
            )
        )
        .min(0)
        .axis_soft_max(m.typing_line_s * 1.5)
        .thresholds(thresholds("green", (m.typing_line_s, "red")))
        .with_target(target("A", f"max({sel(f'wabot:typing_indicator_seconds:p50_{w}')})", "p50"))
        .with_target(target("B", f"max({sel(f'wabot:typing_indicator_seconds:p95_{w}')})", "p95"))
    )
    return [attachments, failure, latency, typing, first]


def spend_panels(t: Thresholds) -> list[Any]:
    """Spend against the operator's daily budget, tokens and cost per message and conversation, refusals."""
    day, hour = t.spend.period, t.spend.dashboard_window
    hours = int(duration_seconds(day) // duration_seconds(hour))
    budget = f"max({sel('wabot_daily_budget_usd')})"
    per_hour = (
        timeseries(
            "Spend per hour",
            f"Model spend in USD over the last {duration_words(hour)} (at the price table's prices, WABOT_PRICES), "
            "against the pace of "
            f"the daily budget (WABOT_DAILY_BUDGET_USD / {hours}; absent while no budget is set). "
            "WabotSpendBurnRateHigh compares the same rates.",
            "currencyUSD",
            span=8,
        )
        .with_target(target("A", f"sum({increase('wabot_cost_usd_total', window=hour)})", f"spent in the last {hour}"))
        .with_target(target("B", f"{budget} / {hours} > 0", "budget pace"))
        .override_by_name("budget pace", [fixed_color("red")])
    )
    per_day = (
        timeseries(
            "Spend per day against the budget",
            f"Model spend in USD over the last {duration_words(day)}, against the daily budget "
            "(WABOT_DAILY_BUDGET_USD; absent while no budget is set).",
            "currencyUSD",
            span=8,
        )
        .with_target(target("A", f"sum({increase('wabot_cost_usd_total', window=day)})", f"spent in the last {day}"))
        .with_target(target("B", f"{budget} > 0", "daily budget"))
        .override_by_name("daily budget", [fixed_color("red")])
    )
    runs = f"sum({increase('wabot_ai_runs_total')})"
    tokens = timeseries(
        "Tokens per message",
        "Model tokens per inbound message by direction (input includes cached_input, the part served from "
        "OpenAI's prompt cache). Input grows with the conversation, which every turn re-sends.",
        "short",
        span=8,
    ).with_target(
        target(
            "A",
            f"sum by (direction) ({increase('wabot_tokens_total')})\n/ on () group_left ()\nclamp_min({runs}, 1)",
            "{{direction}}",
        )
    )
    conversations = f"sum({increase('wabot_conversations_total', window=hour)})"
    per_conversation = (
        timeseries(
            "Cost per conversation",
            f"Model spend of the last {duration_words(hour)} divided by the conversations started in it (a user's "
            "first message, or "
            "the first after WABOT_CONVERSATION_TTL of silence): an approximation, exact per conversation in "
            "`wabot analyze`.",
            "currencyUSD",
            span=8,
        )
        .with_target(
            target(
                "A",
                f"sum({increase('wabot_cost_usd_total', window=hour)})\n/\nclamp_min({conversations}, 1)",
                "per conversation",
            )
        )
        .decimals(4)
    )
    refusals = (
        timeseries(
            "Budget refusals and cut answers",
            "Messages refused because their user used WABOT_USER_DAILY_TOKENS today (no model call), and answers "
            "cut at WABOT_MAX_REPLY_PARTS messages, per rate interval.",
            "short",
            span=8,
        )
        .with_target(target("A", f"sum({increase('wabot_budget_refusals_total')})", "budget refusals"))
        .with_target(target("B", f"sum({increase('wabot_answers_shortened_total')})", "answers cut"))
        .override_by_name("budget refusals", [fixed_color("orange")])
    )
    return [per_hour, per_day, tokens, per_conversation, refusals]


# --- dashboard -----------------------------------------------------------------------------------


def build_dashboard(t: Thresholds = THRESHOLDS) -> dash_m.Dashboard:
    """The dashboard model, panels laid out row by row with stable ids."""
    builder = (
        dash_b.Dashboard(DASHBOARD_TITLE)
        .uid(DASHBOARD_UID)
        .description(
            "Twilio WhatsApp webhook → FastAPI → OpenAI bot with a reply deadline: answer paths, latency "
            f"against Twilio's {t.total_time.twilio_limit_s} s limit, follow-ups, delivery, model usage and SLOs. "
            "Generated by "
            "dashboards/generate.py; do not edit in the UI."
        )
        .tags(["wabot"])
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .tooltip(dash_m.DashboardCursorSync.CROSSHAIR)
        .annotations([])  # {"list": []}: Grafana adds its built-in annotation on load
        .with_variable(dash_b.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            dash_b.QueryVariable("job")
            .label("Job")
            .datasource(DATASOURCE)
            .query("label_values(wabot_build_info, job)")
            .refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dash_m.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(dash_m.VariableOption(selected=True, text="All", value="$__all"))
        )
    )
    sections = (
        ("Overview", overview_stats(t)),
        ("SLOs", slo_panels(t)),
        ("Answer path and latency", answer_path_panels(t)),
        ("Follow-ups, delivery and webhook", followup_panels(t)),
        ("Model", model_panels()),
        ("Media and typing indicator", media_panels(t)),
        ("Spend", spend_panels(t)),
    )
    for row_title, panels in sections:
        builder = builder.with_row(dash_b.Row(row_title))
        for panel in panels:
            builder = builder.with_panel(panel)
    model = builder.build()
    for panel_id, panel in enumerate(model.panels or [], start=1):
        panel.id_val = panel_id
    return model


def dashboard_json(t: Thresholds = THRESHOLDS) -> dict[str, Any]:
    """The dashboard as plain JSON data (what Grafana imports)."""
    data: dict[str, Any] = json.loads(json.dumps(build_dashboard(t), cls=JSONEncoder))
    return data


def render(t: Thresholds = THRESHOLDS) -> str:
    """The exact text of wabot.json: stable key order and indentation, trailing newline."""
    return json.dumps(dashboard_json(t), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def substitute(expr: str, values: dict[str, str] | None = None) -> str:
    """Replace Grafana template variables ($name, ${name}) by plain values; unknown variables raise."""
    values = QUERY_DEFAULTS if values is None else values

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no default for template variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def iter_targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every query target of every panel, rows' nested panels included."""
    found: list[tuple[str, dict[str, Any]]] = []
    for panel in dashboard.get("panels") or []:
        found.extend((panel["title"], t) for t in panel.get("targets") or [])
        for nested in panel.get("panels") or []:
            found.extend((nested["title"], t) for t in nested.get("targets") or [])
    return found


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query target, with template variables replaced by QUERY_DEFAULTS.

    `$__rate_interval` becomes `1m` and `$job` becomes the thresholds' job (`wabot`), so each expression runs
    as-is against a Prometheus that scrapes the bot under that job. Order follows the dashboard; a panel with several
    targets appears once per target.
    """
    return [(title, substitute(t["expr"])) for title, t in iter_targets(dashboard_json())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the generated one")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"dashboard file (default {OUTPUT})")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
        if current != text:
            print(f"{args.output} is out of date: run python dashboards/generate.py", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
