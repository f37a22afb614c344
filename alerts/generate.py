"""Generate alerts/wabot.rules.yml: every recording rule and alert of wabot, from the data at the top.

SLO targets, windows, burn factors and alert thresholds live here and nowhere else (sloth style): the rules
file is a generated, checked-in artifact and a test fails when it differs from what this module builds.

    python alerts/generate.py                             # (re)write alerts/wabot.rules.yml
    python alerts/generate.py --check                     # exit 1 if the checked-in file is stale
    python alerts/generate.py --for-override 5s --out P   # test copy: every alert's `for:` set to 5s

Conventions of the generated rules:

* Everything is aggregated `sum by (job)` (plus the label an alert is about, e.g. `error_type`), so each alert
  carries the Prometheus `job` label and per-instance series of several replicas add up.
* Ratios are zero-safe: denominators are `clamp_min(total, 1e-9)`, so with the bot up and no traffic a ratio
  is 0 (the numerator is 0), never NaN, and it keeps its `job` label (`or vector(0)` would lose it). The one
  success ratio, `wabot:followup_delivery:ratio_rate5m`, is 1 when there were no follow-ups (nothing failed).
  Quantiles are dropped (absent) at no traffic instead: a p95 of "0 s" would be a lie.
* Histogram bucket selectors accept both `le="12.0"` (prometheus-client's spelling, kept by Prometheus 2) and
  `le="12"` (the normalised spelling of Prometheus 3).
* Counters whose label values cannot all be pre-created (`wabot_message_status_total` carries Twilio error
  codes; `wabot_ai_errors_total` is robust either way) use `(x unless x offset 5m) or increase(x[5m])`:
  a series that appeared within the window counts with its whole value, which `increase()` alone would miss
  (a counter born at 1 has no increase). Caveat: after a scrape gap longer than the window, cumulative
  values count again.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# ----------------------------------------------------------------------------------------------------------
# The data: change numbers here, run `python alerts/generate.py`, commit both files.
# ----------------------------------------------------------------------------------------------------------

JOB = "wabot"  # Prometheus scrape job of the bot (deploy/prometheus.yml)
RUNBOOK_BASE_URL = "https://github.com/wabot/wabot/blob/main/alerts/runbooks"
RULES_FILE = Path(__file__).resolve().with_name("wabot.rules.yml")

RATIO_WINDOW = "5m"  # window of the operational ratios and increases
MIN_MESSAGES = 10  # traffic gate: ratio alerts need at least this many messages in RATIO_WINDOW
TIMEOUT_RATIO_MAX = 0.20  # WabotAITimeoutRatioHigh: share of messages answered by holding reply + follow-up
SLOW_REPLY_S = 12  # WabotResponseTimeHigh: a reply this slow leaves no margin before Twilio gives up
SLOW_REPLY_RATIO_MAX = 0.01  # ... when more than this share of replies is that slow
TWILIO_LIMIT_S = 15  # WabotResponseOverTwilioLimit: Twilio drops webhook answers slower than this (any one)
BUSY_RATIO_MAX = 0.05  # WabotRunsAtCapacity: share of messages that found every model slot taken
SIGNATURE_REJECTIONS_MAX = 5  # WabotSignatureRejections: more than this many in RATIO_WINDOW is a spike
ZERO_DENOMINATOR = "1e-9"

# `for:` of each alert; `--for-override` replaces all of them in a test copy.
FOR = {
    "WabotDown": "2m",
    "WabotAITimeoutRatioHigh": "5m",
    "WabotResponseTimeHigh": "2m",
    "WabotResponseOverTwilioLimit": "1m",
    "WabotAIErrors": "1m",
    "WabotFollowupsFailing": "1m",
    "WabotMessageDeliveryFailing": "1m",
    "WabotSignatureRejections": "2m",
    "WabotRunsAtCapacity": "10m",
    "WabotStoreErrors": "2m",
}


@dataclass(frozen=True)
class SLO:
    name: str  # recording-rule stem: wabot:slo_<name>:error_ratio_rate<window>
    alert: str
    title: str
    target: float
    events: str  # for the description: what is counted ...
    bad: str  # ... and what makes one of them bad


SLOS = (
    SLO("reply_15s", "WabotReplySLOBurnRateHigh", "replied within 15 s", 0.999, "replies", "slower than 15 s"),
    SLO(
        "answer_delivered",
        "WabotDeliverySLOBurnRateHigh",
        "answer delivered",
        0.995,
        "messages",
        "left without an answer (AI error or failed follow-up)",
    ),
)
SLO_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")


@dataclass(frozen=True)
class BurnRate:
    severity: str
    long_window: str
    short_window: str
    factor: float
    for_: str


# Google SRE workbook, multiwindow multi-burn-rate alerts (page: 2 % / 5 % of a 30 d budget; ticket: 10 %).
BURN_RATES = (
    BurnRate("critical", "1h", "5m", 14.4, "2m"),
    BurnRate("critical", "6h", "30m", 6, "15m"),
    BurnRate("warning", "1d", "2h", 3, "1h"),
    BurnRate("warning", "3d", "6h", 1, "3h"),
)
SLO_MIN_MESSAGES = 10  # burn-rate alerts need at least this many messages in their long window

# ----------------------------------------------------------------------------------------------------------

HEADER = (
    "# generated by alerts/generate.py — do not edit.\n"
    "# Change the data at the top of alerts/generate.py, then `python alerts/generate.py`; commit both.\n"
    "# Conventions (sum by job, zero-safe ratios via clamp_min, both le spellings): see alerts/generate.py.\n"
)
TEST_COPY_HEADER = (
    "# TEST COPY generated by `alerts/generate.py --for-override {override}`:"
    " every alert's `for:` is {override}.\n"
    "# Never deploy this file; the real rules are alerts/wabot.rules.yml.\n"
)

BY_JOB = "sum by (job)"


def _le(seconds: int) -> str:
    """Selector of one bucket edge in both spellings ("12.0" from prometheus-client, "12" in Prometheus 3)."""
    return f'le=~"{seconds}|{seconds}\\\\.0"'


def _ratio(numerator: str, denominator: str) -> str:
    return f"(\n  {numerator}\n)\n/\nclamp_min(\n  {denominator},\n  {ZERO_DENOMINATOR}\n)"


def _new_safe_increase(selector: str, window: str) -> str:
    return f"({selector} unless {selector} offset {window})\nor\nincrease({selector}[{window}])"


def _over(seconds: int, window: str) -> str:
    """Rate of replies slower than `seconds` (count minus the bucket at that edge): exact, not an estimate."""
    return (
        f"{BY_JOB} (rate(wabot_response_seconds_count[{window}]))\n"
        f"  -\n"
        f"  {BY_JOB} (rate(wabot_response_seconds_bucket{{{_le(seconds)}}}[{window}]))"
    )


def _runbook(alert: str) -> str:
    return f"{RUNBOOK_BASE_URL}/{alert}.md"


def _pct(ratio: float) -> str:
    return f"{ratio * 100:g} %"


def recording_rules() -> list[dict[str, Any]]:
    w = RATIO_WINDOW
    runs = "wabot_ai_runs_total"
    rules: list[dict[str, Any]] = [
        {"record": f"wabot:messages:rate{w}", "expr": f"{BY_JOB} (rate({runs}[{w}]))"},
        {"record": f"wabot:messages:increase{w}", "expr": f"{BY_JOB} (increase({runs}[{w}]))"},
        {"record": f"wabot:ai_runs:rate{w}", "expr": f"sum by (job, outcome) (rate({runs}[{w}]))"},
        {
            "record": f"wabot:ai_timeout:ratio_rate{w}",
            "expr": _ratio(f'{BY_JOB} (rate({runs}{{outcome="timeout"}}[{w}]))', f"{BY_JOB} (rate({runs}[{w}]))"),
        },
        {
            "record": f"wabot:ai_error:ratio_rate{w}",
            "expr": _ratio(f'{BY_JOB} (rate({runs}{{outcome="error"}}[{w}]))', f"{BY_JOB} (rate({runs}[{w}]))"),
        },
        {
            "record": f"wabot:ai_busy:ratio_rate{w}",
            "expr": _ratio(f'{BY_JOB} (rate({runs}{{outcome="busy"}}[{w}]))', f"{BY_JOB} (rate({runs}[{w}]))"),
        },
        {
            "record": f"wabot:ai_errors:increase{w}",
            "expr": f"sum by (job, phase, error_type) (\n{_indent(_new_safe_increase('wabot_ai_errors_total', w))}\n)",
        },
        {
            "record": f"wabot:responses:rate{w}",
            "expr": f"{BY_JOB} (rate(wabot_response_seconds_count[{w}]))",
        },
    ]
    buckets = f"sum by (job, le) (rate(wabot_response_seconds_bucket[{w}]))"
    for name, q in (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99")):
        rules.append(
            {
                "record": f"wabot:response_seconds:{name}_{w}",
                "expr": f"histogram_quantile({q}, {buckets})\nand on (job)\n(wabot:responses:rate{w} > 0)",
            }
        )
    for seconds in (SLOW_REPLY_S, TWILIO_LIMIT_S):
        rules.append(
            {
                "record": f"wabot:response_over_{seconds}s:ratio_rate{w}",
                "expr": _ratio(_over(seconds, w), f"{BY_JOB} (rate(wabot_response_seconds_count[{w}]))"),
            }
        )
    rules += [
        {
            "record": f"wabot:followup_delivery:ratio_rate{w}",
            "expr": "1 - "
            + _ratio(
                f'{BY_JOB} (rate(wabot_followups_total{{outcome="failed"}}[{w}]))',
                f"{BY_JOB} (rate(wabot_followups_total[{w}]))",
            ),
        },
        {
            "record": f"wabot:followups_failed:increase{w}",
            "expr": f'{BY_JOB} (increase(wabot_followups_total{{outcome="failed"}}[{w}]))',
        },
        {
            "record": f"wabot:message_delivery_failures:increase{w}",
            "expr": "sum by (job, status, error_code) (\n"
            + _indent(_new_safe_increase('wabot_message_status_total{status=~"failed|undelivered"}', w))
            + "\n)",
        },
        {
            "record": f"wabot:webhook_rejections:increase{w}",
            "expr": f"sum by (job, reason) (increase(wabot_webhook_rejections_total[{w}]))",
        },
        {
            "record": f"wabot:store_errors:increase{w}",
            "expr": f"sum by (job, op) (increase(wabot_store_errors_total[{w}]))",
        },
        {
            "record": f"wabot:model_calls:rate{w}",
            "expr": f"sum by (job, outcome) (rate(wabot_model_calls_total[{w}]))",
        },
    ]
    return rules


def _indent(text: str, by: str = "  ") -> str:
    return "\n".join(by + line for line in text.splitlines())


def slo_error_ratio(slo: SLO, window: str) -> str:
    total = f"{BY_JOB} (rate(wabot_ai_runs_total[{window}]))"
    if slo.name == "reply_15s":
        return _ratio(_over(TWILIO_LIMIT_S, window), f"{BY_JOB} (rate(wabot_response_seconds_count[{window}]))")
    if slo.name == "answer_delivered":
        # `or 0 * rate(runs)` keeps a term present (as 0) before its first series exists.
        zero = f"0 * rate(wabot_ai_runs_total[{window}])"
        return _ratio(
            f"{BY_JOB} (rate(wabot_ai_errors_total[{window}]) or {zero})\n"
            f'  +\n  {BY_JOB} (rate(wabot_followups_total{{outcome="failed"}}[{window}]) or {zero})',
            total,
        )
    raise ValueError(slo.name)


def slo_recording_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for slo in SLOS:
        rules.append(
            {
                "record": f"wabot:slo_{slo.name}:objective",
                "expr": f"vector({slo.target})",
                "labels": {"job": JOB},
            }
        )
        for window in SLO_WINDOWS:
            rules.append(
                {
                    "record": f"wabot:slo_{slo.name}:error_ratio_rate{window}",
                    "expr": slo_error_ratio(slo, window),
                }
            )
    for window in sorted({b.long_window for b in BURN_RATES}, key=SLO_WINDOWS.index):
        rules.append(
            {
                "record": f"wabot:messages:increase{window}",
                "expr": f"{BY_JOB} (increase(wabot_ai_runs_total[{window}]))",
            }
        )
    return rules


def _alert(
    name: str,
    expr: str,
    severity: str,
    summary: str,
    description: str,
    for_: str | None = None,
    **labels: str,
) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_ is not None:
        rule["for"] = for_
    rule["labels"] = {"severity": severity, **labels}
    rule["annotations"] = {"summary": summary, "description": description, "runbook_url": _runbook(name)}
    return rule


def alert_rules() -> list[dict[str, Any]]:
    w = RATIO_WINDOW
    gate = f"and on (job)\nwabot:messages:increase{w} >= {MIN_MESSAGES}"
    sig = f'wabot:webhook_rejections:increase{w}{{reason="signature"}}'
    return [
        _alert(
            "WabotDown",
            f'up{{job="{JOB}"}} == 0\nor\nabsent(up{{job="{JOB}"}})',
            "critical",
            "wabot is down or not scraped: WhatsApp messages are not being answered.",
            "Prometheus cannot scrape the wabot metrics target{{ with $labels.instance }} {{ . }}{{ end }} "
            '(job "{{ $labels.job }}"), or no such target exists. '
            "No inbound message is answered or measured.",
            FOR["WabotDown"],
        ),
        _alert(
            "WabotAITimeoutRatioHigh",
            f"wabot:ai_timeout:ratio_rate{w} > {TIMEOUT_RATIO_MAX:g}\n{gate}",
            "warning",
            "Many messages hit the reply deadline and are answered by a follow-up.",
            "{{ $value | humanizePercentage }} of the messages to {{ $labels.job }} in the last "
            f"{w} got a holding reply instead of an inline answer (threshold {_pct(TIMEOUT_RATIO_MAX)}, "
            f"at least {MIN_MESSAGES} messages).",
            FOR["WabotAITimeoutRatioHigh"],
        ),
        _alert(
            "WabotResponseTimeHigh",
            f"wabot:response_over_{SLOW_REPLY_S}s:ratio_rate{w} > {SLOW_REPLY_RATIO_MAX:g}\n{gate}",
            "warning",
            f"Webhook replies take longer than {SLOW_REPLY_S} s, close to Twilio's {TWILIO_LIMIT_S} s limit.",
            "{{ $value | humanizePercentage }} of the webhook replies of {{ $labels.job }} in the last "
            f"{w} took longer than {SLOW_REPLY_S} s (threshold {_pct(SLOW_REPLY_RATIO_MAX)}); "
            f"Twilio drops answers slower than {TWILIO_LIMIT_S} s.",
            FOR["WabotResponseTimeHigh"],
        ),
        _alert(
            "WabotResponseOverTwilioLimit",
            f"wabot:response_over_{TWILIO_LIMIT_S}s:ratio_rate{w} > 0",
            "critical",
            f"Webhook replies took longer than {TWILIO_LIMIT_S} s: Twilio dropped them, users got nothing.",
            "{{ $value | humanizePercentage }} of the webhook replies of {{ $labels.job }} in the last "
            f"{w} took longer than {TWILIO_LIMIT_S} s; Twilio gave up on them, so those users got no reply "
            "at all (not even the holding message).",
            FOR["WabotResponseOverTwilioLimit"],
        ),
        _alert(
            "WabotAIErrors",
            f"wabot:ai_errors:increase{w} > 0",
            "warning",
            "AI runs are failing: users get an apology instead of an answer.",
            f"AI runs of {{{{ $labels.job }}}} that ended without an answer in the last {w}: "
            "{{ $value | humanize }} (error type {{ $labels.error_type }}, {{ $labels.phase }} phase); "
            "each of those users got an apology. Log event: ai_error_in_timeout.",
            FOR["WabotAIErrors"],
        ),
        _alert(
            "WabotFollowupsFailing",
            f"wabot:followups_failed:increase{w} > 0",
            "warning",
            "Follow-up answers could not be delivered through Twilio.",
            f"Follow-ups of {{{{ $labels.job }}}} given up after all retries in the last {w}: "
            "{{ $value | humanize }}; those users got a holding reply and then nothing. "
            "Log event: followup_failed.",
            FOR["WabotFollowupsFailing"],
        ),
        _alert(
            "WabotMessageDeliveryFailing",
            f"wabot:message_delivery_failures:increase{w} > 0",
            "warning",
            "Twilio reports outbound WhatsApp messages as failed or undelivered.",
            "Outbound messages of {{ $labels.job }} reported {{ $labels.status }} by Twilio with error code "
            "{{ with $labels.error_code }}{{ . }}{{ else }}none{{ end }} in the last "
            f"{w}: {{{{ $value | humanize }}}} (63016 = outside the 24 h WhatsApp session window). "
            "Log event: message_status.",
            FOR["WabotMessageDeliveryFailing"],
        ),
        _alert(
            "WabotRunsAtCapacity",
            f"wabot:ai_busy:ratio_rate{w} > {BUSY_RATIO_MAX:g}\n{gate}",
            "warning",
            "Every model slot is taken: new messages get the busy holding reply and wait for a slot.",
            "{{ $value | humanizePercentage }} of the messages to {{ $labels.job }} in the last "
            f"{w} found all WABOT_MAX_CONCURRENT_RUNS model slots taken (threshold {_pct(BUSY_RATIO_MAX)}, "
            f"at least {MIN_MESSAGES} messages); their answers come later, as follow-ups. "
            "Log event: runs_at_capacity.",
            FOR["WabotRunsAtCapacity"],
        ),
        _alert(
            "WabotStoreErrors",
            f"wabot:store_errors:increase{w} > 0",
            "warning",
            "The store (SQLite or Redis) is failing: messages are answered without dedupe or journal.",
            f"Store operations of {{{{ $labels.job }}}} that failed in the last {w}: {{{{ $value | humanize }}}} "
            "(operation {{ $labels.op }}). The bot keeps answering, but while this lasts a crash loses what is owed "
            "and a Twilio retry may be answered twice. Log events: store_error, store_unwritable.",
            FOR["WabotStoreErrors"],
        ),
        _alert(
            "WabotSignatureRejections",
            f"{sig} > {SIGNATURE_REJECTIONS_MAX}\nor\n({sig} > 0 unless on (job) wabot:messages:increase{w} > 0)",
            "warning",
            "Webhook requests are rejected for a bad Twilio signature.",
            "Webhook requests to {{ $labels.job }} rejected for an invalid X-Twilio-Signature in the last "
            f"{w}: {{{{ $value | humanize }}}} (more than {SIGNATURE_REJECTIONS_MAX}, or rejections while no "
            "message got through). Likely a wrong TWILIO_AUTH_TOKEN or WABOT_PUBLIC_URL, a proxy rewriting "
            "the URL, or forged requests.",
            FOR["WabotSignatureRejections"],
        ),
    ]


def slo_alert_rules() -> list[dict[str, Any]]:
    rules = []
    for slo in SLOS:
        budget = 1 - slo.target
        for b in BURN_RATES:
            threshold = f"({b.factor:g} * {budget:.6g})"
            stem = f"wabot:slo_{slo.name}:error_ratio_rate"
            expr = (
                f"{stem}{b.long_window} > {threshold}\n"
                f"and on (job)\n{stem}{b.short_window} > {threshold}\n"
                f"and on (job)\nwabot:messages:increase{b.long_window} >= {SLO_MIN_MESSAGES}"
            )
            rules.append(
                _alert(
                    slo.alert,
                    expr,
                    b.severity,
                    f"wabot is burning its '{slo.title}' error budget {b.factor:g}x too fast.",
                    "{{ $value | humanizePercentage }} of the "
                    f"{slo.events} of {{{{ $labels.job }}}} over the "
                    f"last {b.long_window} were {slo.bad} (and over the last {b.short_window} too); the SLO "
                    f"allows {_pct(budget)} (target {_pct(slo.target)}), so the error budget burns more than "
                    f"{b.factor:g}x faster than sustainable.",
                    b.for_,
                    long_window=b.long_window,
                    short_window=b.short_window,
                )
            )
    return rules


def watchdog() -> dict[str, Any]:
    return _alert(
        "Watchdog",
        "vector(1)",
        "none",
        "Always firing: proves the alerting pipeline works (dead man's switch).",
        "This alert always fires. If the deadmansswitch receiver stops getting it, Prometheus, its rule "
        "evaluation or Alertmanager is broken.",
    )


def build(for_override: str | None = None) -> dict[str, Any]:
    groups: list[dict[str, Any]] = [
        {"name": "wabot.rules", "rules": recording_rules()},
        {"name": "wabot-slo.rules", "rules": slo_recording_rules()},
        {"name": "wabot.alerts", "rules": [*alert_rules(), watchdog()]},
        {"name": "wabot-slo.alerts", "rules": slo_alert_rules()},
    ]
    if for_override is not None:
        for group in groups:
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = for_override
    return {"groups": groups}


class _Dumper(yaml.SafeDumper):
    """Block style, indented lists, multi-line expressions as `|` literals: readable in review."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str_representer)

_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def render(for_override: str | None = None) -> str:
    if for_override is not None and not _DURATION.match(for_override):
        raise ValueError(f"not a Prometheus duration: {for_override!r}")
    header = HEADER if for_override is None else TEST_COPY_HEADER.format(override=for_override)
    body = yaml.dump(build(for_override), Dumper=_Dumper, sort_keys=False, width=100_000, allow_unicode=True)
    return header + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"output file (default {RULES_FILE})")
    parser.add_argument("--for-override", default=None, help="test copy: set every alert's `for:` to this")
    parser.add_argument("--check", action="store_true", help="exit 1 if the output file differs")
    args = parser.parse_args(argv)
    if args.for_override is not None and args.out is None:
        parser.error("--for-override needs --out: the checked-in rules file must keep the real durations")
    if args.for_override is not None and not _DURATION.match(args.for_override):
        parser.error(f"--for-override: not a Prometheus duration: {args.for_override!r}")
    out: Path = args.out or RULES_FILE
    text = render(args.for_override)
    if args.check:
        current = out.read_text(encoding="utf-8") if out.exists() else ""
        if current != text:
            print(f"{out} is stale: run python alerts/generate.py", file=sys.stderr)
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
