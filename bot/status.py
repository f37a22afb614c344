"""The status view: what this process did in the last five minutes, and the wabot alerts Prometheus has pending
or firing, as HTML (with an SVG latency histogram), JSON and terminal text.

Served at /status on the metrics port (always; see bot/server.py) and on the webhook port in demo mode, next to
the chat page. `wabot status` prints the JSON of the metrics port as text.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

from bot import __version__
from bot.settings import Settings
from bot.tls import tls_context
from telemetry import spend
from telemetry.metrics import MEDIA_OUTCOMES, TYPING_OUTCOMES
from telemetry.recent import RecentActivity, over_key
from telemetry.thresholds import THRESHOLDS

ALERTS_TIMEOUT_S = 2.0  # a slow Prometheus must not make the status page slow


# ---------------------------------------------------------------------------------------------------- data


def collect(settings: Settings, recent: RecentActivity | None, *, workers: int = 1) -> dict[str, Any]:
    """The status as JSON-ready data. `recent` is None while the app is starting, and always with several
    workers: their windows live in the worker processes, which this one cannot see."""
    data: dict[str, Any] = {
        "version": __version__,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "workers": workers,
        "deadline_s": settings.reply_timeout,
        "followup_timeout_s": settings.followup_timeout,
        "window": None,
        "note": None,
        "since_start": None,
        "prometheus": fetch_alerts(settings.prometheus_url) if settings.prometheus_url else None,
        "process": process_snapshot(),
        "spend": None,
    }
    if workers > 1:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        data["since_start"] = {**_since_start(registry), **_media_since_start(registry)}
        data["spend"] = spend_since_start(settings, registry)
        data["note"] = (
            f"{workers} worker processes answer the webhook; each keeps its own "
            f"{THRESHOLDS.status_window_s / 60:g}-minute window, which this "
            "process cannot see. The counts below are the workers' totals since start (from the shared metrics "
            "directory); for percentiles and ratios over time use Prometheus (the wabot:* recording rules)."
        )
    elif recent is None:
        data["note"] = "The bot is starting: no data yet."
    else:
        pending = int(REGISTRY.get_sample_value("wabot_followups_pending") or 0)
        data["window"] = recent.snapshot(deadline_s=settings.reply_timeout, pending_followups=pending)
        data["spend"] = spend_snapshot(settings)
    return data


# ---------------------------------------------------------------------------------------------------- spend


def spend_snapshot(settings: Settings) -> dict[str, Any]:
    """This process's model spend in the status window and today (UTC), with the budgets it is held to."""
    data = spend.window().snapshot()
    data.update(
        daily_budget_usd=settings.daily_budget_usd,
        user_daily_tokens=settings.user_daily_tokens,
        budget_refusals_since_start=int(REGISTRY.get_sample_value("wabot_budget_refusals_total") or 0),
    )
    return data


def spend_since_start(settings: Settings, registry: CollectorRegistry) -> dict[str, Any]:
    """The workers' spend since start (their windows live in the worker processes, this one cannot see them)."""
    cost, refusals = 0.0, 0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "wabot_cost_usd_total":
                cost += sample.value
            elif sample.name == "wabot_budget_refusals_total":
                refusals += int(sample.value)
    return {
        "cost_usd_since_start": cost,
        "daily_budget_usd": settings.daily_budget_usd,
        "user_daily_tokens": settings.user_daily_tokens,
        "budget_refusals_since_start": refusals,
    }


def _usd(value: float) -> str:
    return f"{value:.4f} USD" if value < 1 else f"{value:,.2f} USD"


def spend_lines(data: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """(label, value, id, detail) of each spend line, shared by the HTML tiles and the text."""
    if data is None:
        return []
    budget = data["daily_budget_usd"]
    limit = f"{data['user_daily_tokens']:,} tokens per user a day" if data["user_daily_tokens"] else "no user limit"
    refused = f"{data['budget_refusals_since_start']} refused since start · {limit}"
    if "cost_usd_since_start" in data:
        return [("Spend since start", _usd(data["cost_usd_since_start"]), "spend-since-start", refused)]
    of_budget = f"{data['cost_usd_today'] / budget:.0%} of the {_usd(budget)} daily budget" if budget else "no budget"
    unpriced = (
        f" · {data['unpriced_tokens_today']:,} tokens of unpriced models" if data["unpriced_tokens_today"] else ""
    )
    return [
        (
            f"Spend, last {data['window_s'] / 60:g} minutes",
            _usd(data["cost_usd_window"]),
            "spend-window",
            f"{data['tokens_window']:,} tokens in {data['model_calls_window']} model calls",
        ),
        (f"Spend today ({data['day']} UTC)", _usd(data["cost_usd_today"]), "spend-today", of_budget + unpriced),
        ("Budget refusals", str(data["budget_refusals_since_start"]), "budget-refusals", limit),
    ]


def process_snapshot() -> dict[str, Any]:
    """This process's memory, for telling a leak from a burst: resident memory now and at its peak (from /proc,
    None elsewhere) and the blocks Python's allocator holds, which fall back when the conversations in flight end
    while resident memory often does not (freed arenas stay mapped)."""
    memory: dict[str, float | None] = {"VmRSS": None, "VmHWM": None}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in memory:
                memory[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return {
        "pid": os.getpid(),
        "rss_mib": memory["VmRSS"],
        "peak_rss_mib": memory["VmHWM"],
        "python_blocks": sys.getallocatedblocks(),
        "threads": threading.active_count(),
    }


def _since_start(registry: CollectorRegistry) -> dict[str, Any]:
    runs: dict[str, int] = {}
    followups: dict[str, int] = {}
    pending = 0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "wabot_ai_runs_total":
                runs[sample.labels["outcome"]] = runs.get(sample.labels["outcome"], 0) + int(sample.value)
            elif sample.name == "wabot_followups_total":
                outcome = sample.labels["outcome"]
                followups[outcome] = followups.get(outcome, 0) + int(sample.value)
            elif sample.name == "wabot_followups_pending":
                pending += int(sample.value)
    return {"messages": sum(runs.values()), "outcomes": runs, "followups": followups, "followups_pending": pending}


def _media_since_start(registry: CollectorRegistry) -> dict[str, dict[str, int]]:
    """Attachments and typing indicators by outcome, the workers' totals (#14)."""
    media, typing = dict.fromkeys(MEDIA_OUTCOMES, 0), dict.fromkeys(TYPING_OUTCOMES, 0)
    for family in registry.collect():
        for sample in family.samples:
            counts = {"wabot_media_total": media, "wabot_typing_indicators_total": typing}.get(sample.name)
            if counts is not None:
                outcome = sample.labels["outcome"]
                counts[outcome] = counts.get(outcome, 0) + int(sample.value)
    return {"media": media, "typing": typing}


def fetch_alerts(base_url: str, timeout_s: float = ALERTS_TIMEOUT_S) -> dict[str, Any]:
    """The wabot alerts (names starting with "Wabot") pending or firing in Prometheus; never raises."""
    result: dict[str, Any] = {"url": base_url, "reachable": False, "error": None, "alerts": []}
    try:
        response = httpx2.get(f"{base_url}/api/v1/alerts", timeout=httpx2.Timeout(timeout_s), verify=tls_context())
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise ValueError(f"HTTP {response.status_code}")
        raw = body["data"]["alerts"]
    except (httpx2.HTTPError, ValueError, KeyError, TypeError) as exc:
        result["error"] = f"{exc.__class__.__name__}: {exc}"[:300]
        return result
    alerts = [
        {
            "name": alert["labels"]["alertname"],
            "state": alert.get("state", ""),
            "severity": alert["labels"].get("severity", ""),
            "active_at": alert.get("activeAt", ""),
            "value": alert.get("value", ""),
            "summary": alert.get("annotations", {}).get("summary", ""),
        }
        for alert in raw
        if alert.get("labels", {}).get("alertname", "").startswith("Wabot")
        and alert.get("state") in ("pending", "firing")
    ]
    alerts.sort(key=lambda a: (a["state"] != "firing", a["name"]))
    result.update(reachable=True, alerts=alerts)
    return result


# ---------------------------------------------------------------------------------------------------- formatting


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f} s"


def _percent(value: float) -> str:
    return f"{value * 100:.1f} %"


def _level(value: float | None, warn: float, bad: float) -> str:
    if value is None or value <= warn:
        return "ok"
    return "bad" if value > bad else "warn"


def _over_line(w: dict[str, Any]) -> str:
    """The replies past the total-time lines the window carries: "0 over 12 s · 0 over 15 s (Twilio's limit)"."""
    slow, limit = w["slow_line_s"], w["twilio_limit_s"]
    return f"{w[over_key(slow)]} over {slow:g} s · {w[over_key(limit)]} over {limit:g} s (Twilio's limit)"


def _bucket_label(le: float | str) -> str:
    return "> 120 s" if le == "+Inf" else f"≤ {le:g} s"


# ---------------------------------------------------------------------------------------------------- HTML

_STYLE = """
body{font:15px/1.4 system-ui,sans-serif;margin:0;background:#f4f6f8;color:#1c2730}
main{max-width:960px;margin:0 auto;padding:16px 20px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:17px;margin:22px 0 8px}
.scope,.note{color:#52606d;margin:0 0 14px}.note{background:#fff4d6;padding:8px 12px;border-radius:6px;color:#5c4400}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:10px;margin:0}
.tile{background:#fff;border-radius:8px;padding:10px 14px;border-left:5px solid #9aa5b1}
.tile dt{font-size:13px;color:#52606d}.tile dd{margin:2px 0;font-size:24px;font-weight:600}
#total-time{font-size:19px;white-space:nowrap}.tile small{color:#52606d}
.ok{border-left-color:#25a244}.warn{border-left-color:#e8a317}.bad{border-left-color:#d64545}
svg{background:#fff;border-radius:8px}table{border-collapse:collapse;background:#fff;width:100%}
td,th{padding:6px 10px;border-bottom:1px solid #e4e7eb;text-align:left}.firing{color:#d64545;font-weight:600}
.pending{color:#b7791f;font-weight:600}
"""

# Replaces <main> with a fresh copy every 2 s, so the numbers are live without a reload (and without a build step).
_SCRIPT = """
setInterval(async () => {
  try {
    const response = await fetch(location.pathname + location.search, {cache: "no-store"});
    if (!response.ok) return;
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html").getElementById("status");
    if (fresh) document.getElementById("status").replaceWith(fresh);
  } catch (error) { /* the bot restarting: try again at the next tick */ }
}, 2000);
"""


def _tile(label: str, value: str, ident: str, level: str = "", detail: str = "") -> str:
    small = f'<small id="{ident}-detail">{html.escape(detail)}</small>' if detail else ""
    return (
        f'<div class="tile {level}"><dt>{html.escape(label)}</dt>'
        f'<dd id="{ident}">{html.escape(value)}</dd>{small}</div>'
    )


def _window_tiles(w: dict[str, Any]) -> str:
    ratio, line = w["timeout_ratio"], w["timeout_ratio_alert_line"]
    p50, p95, p99 = w["total_time_p50_s"], w["total_time_p95_s"], w["total_time_p99_s"]
    failed = w["followups_failed"]
    tiles = [
        _tile("Messages", str(w["messages"]), "messages"),
        _tile("Answered inline", str(w["answered_inline"]), "answered-inline", "ok"),
        _tile("Holding reply + follow-up", str(w["holding_then_followup"]), "holding"),
        _tile("Errors (apology)", str(w["errors"]), "errors", "bad" if w["errors"] else "ok"),
        _tile(
            "Timeout ratio",
            _percent(ratio),
            "timeout-ratio",
            "bad" if ratio > line else "ok",
            f"alert line {_percent(line)}",
        ),
        _tile(
            "Total time p50 · p95 · p99",
            "–" if p50 is None else " · ".join(f"{v:.2f}" for v in (p50, p95, p99)) + " s",
            "total-time",
            _level(p99, w["slow_line_s"], w["twilio_limit_s"]),
            _over_line(w),
        ),
        _tile(
            "Follow-ups pending",
            str(w["followups_pending"]),
            "followups-pending",
            "",
            f"{w['followups_delivered']} delivered · {failed} failed",
        ),
        _tile("Follow-ups failed", str(failed), "followups-failed", "bad" if failed else "ok"),
        *_media_tiles(w),
    ]
    return "".join(tiles)


def _outcome_counts(outcomes: dict[str, int]) -> str:
    """Every outcome seen, in the metrics' order, underscores as spaces: "3 ok · 1 fetch error"."""
    return " · ".join(f"{n} {o.replace('_', ' ')}" for o, n in outcomes.items() if n) or "none"


def _share_verdict(ratio: float, line: float, count: int, gate: int) -> str:
    """Where a failure share stands against its alert, gate included: the alert ignores fewer than `gate`."""
    if count < gate:
        return f"{_percent(ratio)} of {count}, below the alert's gate of {gate}"
    return f"{_percent(ratio)} of {count}, {'ABOVE' if ratio > line else 'below'} the alert line {_percent(line)}"


def _firing(ratio: float, line: float, count: int, gate: int) -> bool:
    return count >= gate and ratio > line


def _media_tiles(w: dict[str, Any]) -> list[str]:
    """Attachments (#14) and typing indicators: counts, failure shares against their alerts, transcription and
    arrival -> indicator times."""
    m, t = w["media"], w["typing"]
    media_bad = _firing(m["failure_ratio"], m["failure_ratio_alert_line"], m["read"], m["min_attachments"])
    typing_bad = _firing(t["failure_ratio"], t["failure_ratio_alert_line"], t["indicators"], t["min_indicators"])
    first = t["first_p95_s"]
    return [
        _tile(
            "Attachments",
            str(m["attachments"]),
            "attachments",
            "bad" if media_bad else "ok",
            f"{_outcome_counts(m['outcomes'])} · failure share "
            + _share_verdict(m["failure_ratio"], m["failure_ratio_alert_line"], m["read"], m["min_attachments"]),
        ),
        _tile(
            "Transcription p50 · p95",
            "–"
            if m["transcription_p50_s"] is None
            else f"{m['transcription_p50_s']:.2f} · {m['transcription_p95_s']:.2f} s",
            "transcription",
            "",
            f"{m['transcriptions']} voice notes",
        ),
        _tile(
            "Typing indicators",
            f"{t['outcomes']['sent']} sent · {t['outcomes']['failed']} failed",
            "typing",
            "bad" if typing_bad else "warn" if first is not None and first > t["line_s"] else "ok",
            f"arrival → accepted p95 {_seconds(first)} (line {t['line_s']:g} s) · failed share "
            + _share_verdict(t["failure_ratio"], t["failure_ratio_alert_line"], t["indicators"], t["min_indicators"]),
        ),
    ]


def _media_text(w: dict[str, Any]) -> list[str]:
    """The attachment and typing-indicator lines of `wabot status`."""
    m, t = w["media"], w["typing"]
    media_share = _share_verdict(m["failure_ratio"], m["failure_ratio_alert_line"], m["read"], m["min_attachments"])
    typing_share = _share_verdict(
        t["failure_ratio"], t["failure_ratio_alert_line"], t["indicators"], t["min_indicators"]
    )
    return [
        f"  attachments          {m['attachments']}: {_outcome_counts(m['outcomes'])}",
        f"                       failure share {media_share}",
        f"  transcription        p50 {_seconds(m['transcription_p50_s'])} · p95 {_seconds(m['transcription_p95_s'])} "
        f"({m['transcriptions']} voice notes)",
        f"  typing indicators    {t['outcomes']['sent']} sent · {t['outcomes']['failed']} failed "
        f"(failed share {typing_share})",
        f"                       arrival → accepted p95 {_seconds(t['first_p95_s'])} (line {t['line_s']:g} s)",
    ]


def histogram_svg(buckets: list[dict[str, Any]], deadline_s: float, slow_s: float, limit_s: float) -> str:
    """Bars per bucket of total time; colour by where the bucket ends against the deadline and the slow line."""
    width, height, left, bottom, top = 720, 170, 36, 36, 14
    bar_w = (width - left - 8) / len(buckets)
    peak = max((b["count"] for b in buckets), default=0) or 1
    plot_h = height - bottom - top
    parts = [
        f'<svg id="histogram" role="img" aria-label="total time histogram" viewBox="0 0 {width} {height}" '
        f'width="100%" xmlns="http://www.w3.org/2000/svg">',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - 4}" y2="{height - bottom}" stroke="#9aa5b1"/>',
        f'<text x="4" y="{top + 8}" font-size="11" fill="#52606d">{peak}</text>',
    ]
    for i, bucket in enumerate(buckets):
        le, count = bucket["le"], bucket["count"]
        edge = float("inf") if le == "+Inf" else float(le)
        colour = "#25a244" if edge <= deadline_s else "#e8a317" if edge <= slow_s else "#d64545"
        h = plot_h * count / peak
        x = left + i * bar_w
        label = _bucket_label(le).replace("≤ ", "")
        parts.append(
            f'<rect x="{x + 2:.1f}" y="{height - bottom - h:.1f}" width="{bar_w - 4:.1f}" height="{h:.1f}" '
            f'fill="{colour}"><title>{html.escape(_bucket_label(le))}: {count}</title></rect>'
            f'<text x="{x + bar_w / 2:.1f}" y="{height - bottom + 14}" font-size="10" text-anchor="middle" '
            f'fill="#52606d">{html.escape(label)}</text>'
        )
        if count:
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{height - bottom - h - 3:.1f}" font-size="10" '
                f'text-anchor="middle">{count}</text>'
            )
    parts.append(
        f'<text x="{left}" y="{height - 4}" font-size="11" fill="#52606d">green: within the {deadline_s:g} s '
        f"deadline · amber: up to {slow_s:g} s · red: past {slow_s:g} s (Twilio gives up at {limit_s:g} s)</text></svg>"
    )
    return "".join(parts)


def _alerts_html(prometheus: dict[str, Any] | None) -> str:
    if prometheus is None:
        return '<p id="alerts">Set WABOT_PROMETHEUS_URL to list the wabot alerts pending or firing here.</p>'
    url = html.escape(prometheus["url"])
    if not prometheus["reachable"]:
        return f'<p id="alerts" class="bad">Prometheus unreachable at {url}: {html.escape(prometheus["error"])}</p>'
    if not prometheus["alerts"]:
        return f'<p id="alerts">No wabot alert pending or firing in Prometheus ({url}).</p>'
    rows = "".join(
        f'<tr><td class="{html.escape(a["state"])}">{html.escape(a["state"])}</td><td>{html.escape(a["name"])}</td>'
        f"<td>{html.escape(a['severity'])}</td><td>{html.escape(a['active_at'])}</td>"
        f"<td>{html.escape(a['summary'])}</td></tr>"
        for a in prometheus["alerts"]
    )
    return (
        f'<table id="alerts"><tr><th>state</th><th>alert</th><th>severity</th><th>since</th><th>summary</th></tr>'
        f"{rows}</table><p class=scope>from {url}</p>"
    )


def render_html(data: dict[str, Any]) -> str:
    """The status page: plain HTML, inline CSS and a 6-line refresh script; nothing loaded from elsewhere."""
    window = data["window"]
    window_s = THRESHOLDS.status_window_s if window is None else window["window_s"]
    scope = (
        f"Last {window_s / 60:g} minutes of this process"
        if data["workers"] == 1
        else f"{data['workers']} workers, totals since start"
    )
    body = [
        "<h1>wabot status</h1>",
        f'<p class="scope">{scope} · reply deadline <b id="deadline">{data["deadline_s"]:g} s</b> · follow-up '
        f"budget {data['followup_timeout_s']:g} s · wabot {html.escape(data['version'])} · "
        f"{html.escape(data['generated_at'])}</p>",
    ]
    if data["note"]:
        body.append(f'<p class="note" id="note">{html.escape(data["note"])}</p>')
    if window is not None:
        body.append(f'<dl class="tiles">{_window_tiles(window)}</dl>')
        body.append("<h2>Total time, request arrival to reply</h2>")
        body.append(
            histogram_svg(window["histogram"], data["deadline_s"], window["slow_line_s"], window["twilio_limit_s"])
        )
    elif data["since_start"] is not None:
        s = data["since_start"]
        outcomes = s["outcomes"]
        tiles = [
            _tile("Messages since start", str(s["messages"]), "messages"),
            _tile("Answered inline", str(outcomes.get("ok", 0)), "answered-inline", "ok"),
            _tile("Holding reply + follow-up", str(outcomes.get("timeout", 0) + outcomes.get("busy", 0)), "holding"),
            _tile("Errors (apology)", str(outcomes.get("error", 0)), "errors"),
            _tile("Follow-ups pending", str(s["followups_pending"]), "followups-pending"),
            _tile("Follow-ups failed", str(s["followups"].get("failed", 0)), "followups-failed"),
            _tile("Attachments", str(sum(s["media"].values())), "attachments", "", _outcome_counts(s["media"])),
            _tile("Typing indicators", f"{s['typing']['sent']} sent · {s['typing']['failed']} failed", "typing"),
        ]
        body.append(f'<dl class="tiles">{"".join(tiles)}</dl>')
    spent = spend_lines(data.get("spend"))
    if spent:
        body.append("<h2>Spend (this process)</h2>")
        spend_tiles = "".join(_tile(label, value, ident, detail=detail) for label, value, ident, detail in spent)
        body.append(f'<dl class="tiles">{spend_tiles}</dl>')
    body.append("<h2>Alerts</h2>")
    body.append(_alerts_html(data["prometheus"]))
    body.append(f'<p class="scope" id="process">{html.escape(_process_line(data["process"]))}</p>')
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>wabot status</title>'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<style>{_STYLE}</style></head><body><main id="status">{"".join(body)}</main>'
        f"<script>{_SCRIPT}</script></body></html>"
    )


# ---------------------------------------------------------------------------------------------------- text


def render_text(data: dict[str, Any]) -> str:
    """What `wabot status` prints."""
    lines = [f"wabot {data['version']} · reply deadline {data['deadline_s']:g} s · {data['generated_at']}"]
    if data["note"]:
        lines.append(f"note: {data['note']}")
    w = data["window"]
    if w is not None:
        line = w["timeout_ratio_alert_line"]
        verdict = "ABOVE the alert line" if w["timeout_ratio"] > line else "below the alert line"
        p = [w["total_time_p50_s"], w["total_time_p95_s"], w["total_time_p99_s"]]
        lines += [
            f"last {w['window_s'] / 60:g} minutes of this process:",
            f"  messages             {w['messages']}",
            f"  answered inline      {w['answered_inline']}",
            f"  holding + follow-up  {w['holding_then_followup']}",
            f"  errors (apology)     {w['errors']}",
            f"  timeout ratio        {_percent(w['timeout_ratio'])} ({verdict}, {_percent(line)})",
            f"  total time           p50 {_seconds(p[0])} · p95 {_seconds(p[1])} · p99 {_seconds(p[2])}",
            f"                       {_over_line(w)}",
            f"  follow-ups           {w['followups_pending']} pending · {w['followups_delivered']} delivered · "
            f"{w['followups_failed']} failed",
            *_media_text(w),
            "  total time histogram:",
        ]
        peak = max((b["count"] for b in w["histogram"]), default=0) or 1
        for bucket in w["histogram"]:
            if bucket["count"]:
                bar = "█" * max(1, round(30 * bucket["count"] / peak))
                lines.append(f"    {_bucket_label(bucket['le']):>9}  {bar} {bucket['count']}")
    elif data["since_start"] is not None:
        s = data["since_start"]
        lines.append(
            f"since start: {s['messages']} messages {s['outcomes']}, follow-ups {s['followups']}, "
            f"{s['followups_pending']} pending"
        )
        lines.append(
            f"  attachments {sum(s['media'].values())}: {_outcome_counts(s['media'])} · typing indicators "
            f"{s['typing']['sent']} sent · {s['typing']['failed']} failed"
        )
    for label, value, _, detail in spend_lines(data.get("spend")):
        lines.append(f"  {label.lower():<20} {value} ({detail})")
    prometheus = data["prometheus"]
    lines.append(_process_line(data["process"]))
    if prometheus is None:
        lines.append("alerts: WABOT_PROMETHEUS_URL is not set")
    elif not prometheus["reachable"]:
        lines.append(f"alerts: Prometheus unreachable at {prometheus['url']}: {prometheus['error']}")
    elif not prometheus["alerts"]:
        lines.append(f"alerts: none pending or firing ({prometheus['url']})")
    else:
        lines.append(f"alerts ({prometheus['url']}):")
        for alert in prometheus["alerts"]:
            lines.append(f"  {alert['state']:<8} {alert['name']} [{alert['severity']}] since {alert['active_at']}")
    return "\n".join(lines)


def _process_line(process: dict[str, Any]) -> str:
    memory = "memory unknown"
    if process["rss_mib"] is not None:
        memory = f"resident {process['rss_mib']:.0f} MiB (peak {process['peak_rss_mib']:.0f} MiB)"
    return (
        f"process {process['pid']}: {memory} · {process['python_blocks']:,} Python blocks · "
        f"{process['threads']} threads"
    )


# ---------------------------------------------------------------------------------------------------- serving


def wants_json(path: str, query: dict[str, list[str]] | dict[str, str]) -> bool:
    fmt = query.get("format")
    return path.endswith(".json") or fmt in ("json", ["json"])


def render(data: dict[str, Any], as_json: bool) -> tuple[bytes, str]:
    """The body and content type of a /status response."""
    if as_json:
        return json.dumps(data).encode(), "application/json"
    return render_html(data).encode(), "text/html; charset=utf-8"


router = APIRouter()


@router.get("/status")
@router.get("/status.json")
async def status_page(request: Request) -> Response:
    """The status view on the webhook port (demo mode only: in production it is on the metrics port)."""
    services = getattr(request.app.state, "services", None)
    settings: Settings = request.app.state.settings
    # In a thread: the Prometheus query blocks for up to ALERTS_TIMEOUT_S.
    data = await asyncio.to_thread(collect, settings, services.recent if services else None)
    if wants_json(request.url.path, dict(request.query_params)):
        return JSONResponse(data, headers={"Cache-Control": "no-store"})
    return HTMLResponse(render_html(data), headers={"Cache-Control": "no-store"})
