"""The metric names our operations files query, read back out of them.

The dashboard (``infra/grafana``) and the alert rules (``infra/prometheus``) are only
useful if every metric they name exists in a real scrape. The unit tests check the names
against :data:`DOCUMENTED_METRICS`; a serve test checks them against a live Prometheus.
Both need the names exactly as written, so the extractor must not invent any: label
names, functions, keywords, durations, numbers and strings are never metric names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

_ROUTER_HISTOGRAMS = (
    "ray_llm_fleet_time_to_first_token_seconds",
    "ray_llm_fleet_inter_token_latency_seconds",
    "ray_llm_fleet_request_latency_seconds",
)

DOCUMENTED_METRICS: frozenset[str] = frozenset(
    {
        # Router (the `router` ingress deployment); labels model, endpoint, status, reason, state.
        "ray_llm_fleet_requests_total",
        "ray_llm_fleet_rejections_total",
        "ray_llm_fleet_prompt_tokens_total",
        "ray_llm_fleet_completion_tokens_total",
        *(
            f"{name}_{suffix}"
            for name in _ROUTER_HISTOGRAMS
            for suffix in ("bucket", "sum", "count")
        ),
        "ray_llm_fleet_requests_in_flight",
        "ray_llm_fleet_client_disconnects_total",
        "ray_llm_fleet_model_ready",
        "ray_llm_fleet_model_replicas",
        "ray_llm_fleet_model_min_replicas",
        "ray_llm_fleet_model_max_replicas",
        # Engines (vLLM's own metrics through Ray); labels model_name, engine, ReplicaId.
        "ray_vllm_num_requests_running",
        "ray_vllm_num_requests_waiting",
        "ray_vllm_kv_cache_usage_perc",
        "ray_vllm_prefix_cache_queries_total",
        "ray_vllm_prefix_cache_hits_total",
        "ray_vllm_time_to_first_token_seconds_bucket",
        "ray_vllm_inter_token_latency_seconds_bucket",
        "ray_vllm_generation_tokens_total",
        "ray_vllm_prompt_tokens_total",
        # Ray Serve's own.
        "ray_serve_deployment_replica_healthy",
    }
)
"""Every metric name the dashboard and alerts may use, as Prometheus scrapes it from Ray."""

# Prometheus 2.x/3.x functions; a call to anything else is a typo, not a metric.
PROMQL_FUNCTIONS: frozenset[str] = frozenset(
    [
        "abs",
        "absent",
        "absent_over_time",
        "acos",
        "acosh",
        "asin",
        "asinh",
        "atan",
        "atanh",
        "avg_over_time",
        "ceil",
        "changes",
        "clamp",
        "clamp_max",
        "clamp_min",
        "cos",
        "cosh",
        "count_over_time",
        "day_of_month",
        "day_of_week",
        "day_of_year",
        "days_in_month",
        "deg",
        "delta",
        "deriv",
        "double_exponential_smoothing",
        "end",
        "exp",
        "first_over_time",
        "floor",
        "histogram_avg",
        "histogram_count",
        "histogram_fraction",
        "histogram_quantile",
        "histogram_stddev",
        "histogram_stdvar",
        "histogram_sum",
        "holt_winters",
        "hour",
        "idelta",
        "increase",
        "info",
        "irate",
        "label_join",
        "label_replace",
        "last_over_time",
        "ln",
        "log10",
        "log2",
        "mad_over_time",
        "max_over_time",
        "min_over_time",
        "minute",
        "month",
        "pi",
        "predict_linear",
        "present_over_time",
        "quantile_over_time",
        "rad",
        "rate",
        "resets",
        "round",
        "scalar",
        "sgn",
        "sin",
        "sinh",
        "sort",
        "sort_by_label",
        "sort_by_label_desc",
        "sort_desc",
        "sqrt",
        "start",
        "stddev_over_time",
        "stdvar_over_time",
        "sum_over_time",
        "tan",
        "tanh",
        "time",
        "timestamp",
        "ts_of_first_over_time",
        "ts_of_last_over_time",
        "ts_of_max_over_time",
        "ts_of_min_over_time",
        "vector",
        "year",
    ]
)
# Keywords are case-insensitive in PromQL's lexer; functions are not.
_AGGREGATIONS = frozenset(
    [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ]
)
_LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"})

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$\w+)          # Grafana template variables
  | (?P<number>(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\w*)  # also 5m, 1h30m
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<punct>[(){}\[\],])
  | (?P<operator>[-+*/%^=!<>~@])
    """,
    re.VERBOSE,
)
_SKIPPED = frozenset({"space", "comment"})


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot read PromQL at {expr[position:]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind not in _SKIPPED:
            tokens.append((kind, match.group()))
        position = match.end()
    return tokens


def _skip_to(tokens: list[tuple[str, str]], start: int, closer: str, expr: str) -> int:
    """Index just past the first ``closer`` punctuation at or after ``start``."""
    for index in range(start, len(tokens)):
        if tokens[index] == ("punct", closer):
            return index + 1
    raise ValueError(f"missing {closer!r} in {expr!r}")


def _matcher_names(tokens: list[tuple[str, str]]) -> Iterator[str]:
    """The metric name of a ``{__name__="..."}`` matcher (an exact one: a regex names none)."""
    for index in range(len(tokens) - 2):
        (_, label), (_, operator), (kind, value) = tokens[index : index + 3]
        if label == "__name__" and operator == "=" and kind == "string":
            yield value[1:-1]


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects, exactly as written.

    Raises ValueError for text that is not PromQL or calls an unknown function.
    """
    tokens = _tokens(expr)
    names: set[str] = set()
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1] if index + 1 < len(tokens) else ("", "")
        if (kind, text) == ("punct", "{"):
            end = _skip_to(tokens, index + 1, "}", expr)
            names.update(_matcher_names(tokens[index + 1 : end - 1]))
            index = end
        elif (kind, text) == ("punct", "["):  # range, subquery or Grafana interval
            index = _skip_to(tokens, index + 1, "]", expr)
        elif kind != "ident":
            index += 1
        elif text.lower() in _LABEL_LIST_KEYWORDS and following == ("punct", "("):
            index = _skip_to(tokens, index + 2, ")", expr)
        elif text.lower() in _LABEL_LIST_KEYWORDS | _KEYWORDS | _AGGREGATIONS:
            index += 1
        elif following == ("punct", "("):
            if text not in PROMQL_FUNCTIONS:
                raise ValueError(f"unknown PromQL function {text!r} in {expr!r}")
            index += 1
        else:
            names.add(text)
            index += 1
    return names


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row keeps its panels inside


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel of a Grafana dashboard, rows' nested panels included."""
    return list(_panels(dashboard.get("panels", [])))


_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.*),\s*[a-zA-Z_]\w*\s*\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<expr>.*)\)\s*$", re.S)


def _variable_query(variable: dict[str, Any]) -> str | None:
    """The PromQL inside a Grafana query variable; label_values(label) and metrics(regex)
    name no metric."""
    query = variable.get("query", "")
    text = query.get("query", "") if isinstance(query, dict) else str(query)
    if match := _LABEL_VALUES.match(text):
        return match["selector"]
    if match := _QUERY_RESULT.match(text):
        return match["expr"]
    return None


def dashboard_queries(path: str | Path) -> list[str]:
    """Every PromQL expression of a Grafana dashboard: panel targets (rows' panels included)
    and the metric selectors of its query variables."""
    dashboard = json.loads(Path(path).read_text())
    queries = [
        target["expr"]
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query" and (query := _variable_query(variable)):
            queries.append(query)
    return queries


def rule_queries(path: str | Path) -> list[str]:
    """Every ``expr`` of a Prometheus rules file (alerting and recording rules)."""
    rules = yaml.safe_load(Path(path).read_text())
    return [str(rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def metric_names_used(dashboard: str | Path, rules: str | Path) -> set[str]:
    """The metric names the dashboard and the rules select, as written (``_bucket``,
    ``_total`` and the like kept), which is how a scrape names them."""
    names: set[str] = set()
    for expr in [*dashboard_queries(dashboard), *rule_queries(rules)]:
        names |= promql_metric_names(expr)
    return names
