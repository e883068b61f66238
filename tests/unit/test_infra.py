"""The operations files under infra/: Prometheus config, alert rules, Grafana dashboard.

No cluster: promtool (Debian package `prometheus`) validates the config and rules, runs the
alert unit tests, and parses every dashboard query; the metric names they use are checked
against the documented list (a serve test checks them against a real scrape).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infra_queries import (
    DOCUMENTED_METRICS,
    dashboard_panels,
    dashboard_queries,
    metric_names_used,
    promql_metric_names,
    rule_queries,
)

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "infra" / "prometheus"
CONFIG = PROMETHEUS / "prometheus.yml"
ALERTS = PROMETHEUS / "alerts.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
DASHBOARD = REPO / "infra" / "grafana" / "llm-fleet-dashboard.json"
DATASOURCE = "${datasource}"
ALERT_NAMES = {
    "LLMFleetHighErrorRate",
    "LLMFleetTTFTP99High",
    "LLMFleetModelNotReady",
    "LLMFleetReplicasAtMax",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found: install the Debian package `prometheus` "
            "(apt-get install prometheus), which provides /usr/bin/promtool"
        )
    return path


def run_promtool(promtool: str, *args: str | Path) -> str:
    result = subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(map(str, args))} failed:\n{output}"
    return output


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def load_alerts() -> dict[str, dict[str, Any]]:
    (group,) = yaml.safe_load(ALERTS.read_text())["groups"]
    assert group["name"] == "llm-fleet"
    return {rule["alert"]: rule for rule in group["rules"]}


# --- Prometheus config and alert rules ------------------------------------------------------


def test_prometheus_config_passes_promtool(promtool: str) -> None:
    output = run_promtool(promtool, "check", "config", CONFIG)
    assert "1 rule files found" in output  # alerts.yml resolved relative to the config


def test_prometheus_config_scrapes_ray_service_discovery() -> None:
    config = yaml.safe_load(CONFIG.read_text())

    (job,) = config["scrape_configs"]
    assert job["job_name"] == "ray"
    assert job["file_sd_configs"] == [{"files": ["/tmp/ray/prom_metrics_service_discovery.json"]}]
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == ["alerts.yml"]


def test_alert_rules_pass_promtool(promtool: str) -> None:
    output = run_promtool(promtool, "check", "rules", ALERTS)
    assert f"{len(ALERT_NAMES)} rules found" in output


def test_alerts_fire_only_for_the_failing_model(promtool: str) -> None:
    """promtool's rule unit tests: synthetic series where one model trips each alert and
    the others (healthy, scaled to zero, fixed size, ...) must stay quiet."""
    output = run_promtool(promtool, "test", "rules", ALERTS_TEST)
    assert "SUCCESS" in output


def test_alerts_have_severity_summary_and_description() -> None:
    alerts = load_alerts()

    assert set(alerts) == ALERT_NAMES
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert "First" in rule["annotations"]["description"], f"{name}: say what to do first"
    assert alerts["LLMFleetHighErrorRate"]["for"] == "5m"
    assert alerts["LLMFleetTTFTP99High"]["for"] == "10m"
    assert alerts["LLMFleetModelNotReady"]["for"] == "5m"
    assert alerts["LLMFleetReplicasAtMax"]["for"] == "15m"


# --- Grafana dashboard ----------------------------------------------------------------------


def test_dashboard_has_the_operator_panels() -> None:
    titles = [panel["title"].lower() for panel in dashboard_panels(load_dashboard())]

    for wanted in ["requests/s", "error rate", "ttft", "tokens/s", "replicas", "queue depth"]:
        assert any(wanted in title for title in titles), f"no panel titled like {wanted!r}"
    assert any("kv cache" in title for title in titles)


def test_dashboard_queries_use_the_datasource_variable() -> None:
    dashboard = load_dashboard()
    panels = [panel for panel in dashboard_panels(dashboard) if panel["type"] != "row"]

    assert panels
    for panel in panels:
        assert panel["datasource"]["uid"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": DATASOURCE}
    ids = [panel["id"] for panel in dashboard_panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_dashboard_variables() -> None:
    variables = {var["name"]: var for var in load_dashboard()["templating"]["list"]}

    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["query"]["query"] == "label_values(ray_llm_fleet_requests_total, model)"
    assert model["datasource"]["uid"] == DATASOURCE
    assert model["includeAll"] and model["allValue"] == ".*"


def test_every_model_scoped_query_follows_the_model_variable() -> None:
    for panel in dashboard_panels(load_dashboard()):
        for target in panel.get("targets", []):
            expr = target["expr"]
            if promql_metric_names(expr) == {"ray_serve_deployment_replica_healthy"}:
                continue  # per Serve deployment, not per model
            selectors = re.findall(r"\b(ray_\w+)\{([^}]*)\}", expr)
            assert len(selectors) == len(re.findall(r"\bray_\w+", expr)), expr
            for metric, matchers in selectors:
                label = "model_name" if metric.startswith("ray_vllm_") else "model"
                assert f'{label}=~"$model"' in matchers, expr


def grafana_to_promql(expr: str) -> str:
    """What Grafana sends: its variables interpolated (a range, or a regex for $model)."""
    expr = re.sub(r"\$\{?__\w+\}?", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool parses each query as a recording rule: a typo in an expression fails here."""
    queries = dashboard_queries(DASHBOARD)
    rules = [
        {"record": f"dashboard:query_{index}", "expr": grafana_to_promql(expr)}
        for index, expr in enumerate(queries)
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    output = run_promtool(promtool, "check", "rules", path)
    assert f"{len(queries)} rules found" in output


# --- Metric names -------------------------------------------------------------------------


def test_dashboard_and_alerts_use_only_documented_metrics() -> None:
    used = metric_names_used(DASHBOARD, ALERTS)

    assert used - DOCUMENTED_METRICS == set()
    # The panels and alerts the operators rely on are actually there.
    assert {
        "ray_llm_fleet_requests_total",
        "ray_llm_fleet_time_to_first_token_seconds_bucket",
        "ray_llm_fleet_model_ready",
        "ray_llm_fleet_model_replicas",
        "ray_llm_fleet_model_max_replicas",
        "ray_vllm_num_requests_waiting",
        "ray_vllm_kv_cache_usage_perc",
    } <= used


def test_rule_queries_read_every_alert_expression() -> None:
    queries = rule_queries(ALERTS)

    assert len(queries) == len(ALERT_NAMES)
    assert promql_metric_names(queries[0]) == {"ray_llm_fleet_requests_total"}


def test_dashboard_queries_walk_rows_and_query_variables(tmp_path: Path) -> None:
    dashboard = {
        "panels": [
            {"type": "timeseries", "targets": [{"expr": "sum(top_metric)"}, {"refId": "B"}]},
            {
                "type": "row",
                "collapsed": True,
                "panels": [{"type": "stat", "targets": [{"expr": "rate(nested_total[5m])"}]}],
            },
        ],
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {"name": "a", "type": "query", "query": "label_values(var_metric{job=~'a,b'}, x)"},
                {"name": "b", "type": "query", "query": {"query": "label_values(model)"}},
                {"name": "c", "type": "query", "query": {"query": "query_result(max(res_metric))"}},
                {"name": "d", "type": "query", "query": "metrics(ray_.*)"},
                {"name": "e", "type": "custom", "query": "chat,completions"},
            ]
        },
    }
    path = tmp_path / "dashboard.json"
    path.write_text(json.dumps(dashboard))

    queries = dashboard_queries(path)

    assert queries == [
        "sum(top_metric)",
        "rate(nested_total[5m])",
        "var_metric{job=~'a,b'}",
        "max(res_metric)",
    ]
    names: set[str] = set().union(*map(promql_metric_names, queries))
    assert names == {"top_metric", "nested_total", "var_metric", "res_metric"}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (model) (rate(ray_llm_fleet_requests_total{model=~"$model", status=~"5.."}'
            "[$__rate_interval]))",
            {"ray_llm_fleet_requests_total"},
        ),
        (
            'histogram_quantile(0.99, sum by (le, model) (rate(ttft_bucket{le!="+Inf"}[5m])))',
            {"ttft_bucket"},
        ),
        (
            "sum(rate(a_total[5m])) without (instance, le) / on (model) group_left (endpoint) b",
            {"a_total", "b"},
        ),
        ("a offset 5m > bool 0.5 and b unless c or d atan2 e", {"a", "b", "c", "d", "e"}),
        ("a OFFSET -1h30m AND ON(model) b", {"a", "b"}),
        ('count_values("status", x) > ignoring(status) group_right y', {"x", "y"}),
        ('label_replace(up, "dst", "$1", "src", "(model|rate)")', {"up"}),
        ("max_over_time(rate(x_total[1m])[5m:30s]) @ end()", {"x_total"}),
        ('{__name__="by_name", model="sum"} + {__name__=~"regex_.*"}', {"by_name"}),
        ("1e-3 * 0x1F + Inf - NaN + .5 - 2", set()),
        ("topk by (model) (5, foo) # bar is a comment", {"foo"}),
        ("vector(1) + time() + scalar(s)", {"s"}),
        ("sum(x) by (model) > 0", {"x"}),
        ("sum without () (x) + min by (model)(y)", {"x", "y"}),
        ("rule:ray_requests:rate5m / ignoring (reason) z", {"rule:ray_requests:rate5m", "z"}),
        ("x{reason='overload', status=\"by\", q=`le}`} - x offset 1d", {"x"}),
        ("quantile(0.9, rate(w[${__range}])) > $threshold", {"w"}),
        (
            "absent(ray_llm_fleet_model_ready) or absent_over_time(v[10m])",
            {"ray_llm_fleet_model_ready", "v"},
        ),
    ],
)
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


@pytest.mark.parametrize(
    ("expr", "error"),
    [
        ("histogram_quantil(0.9, x)", "unknown PromQL function 'histogram_quantil'"),
        ('x{model="a}', "cannot read PromQL"),
        ("rate(x[5m)", "missing ']'"),
    ],
)
def test_promql_metric_names_refuses_what_is_not_promql(expr: str, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        promql_metric_names(expr)
