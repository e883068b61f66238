"""Operations on the real fleet: health and readiness, Prometheus, Server-Timing, logs.

Readiness during startup is what the shared fleet fixture saw while its engines
loaded (``fleet.startup``): no extra engine is started for it. A real Prometheus
server scrapes the cluster through Ray's service discovery file, with the repo's own
``infra/prometheus`` config and alert rules.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.infra_queries import metric_names_used
from tests.serve.conftest import (
    BROKEN_ENGINE_MODEL,
    CHAT_MODEL,
    COMPLETION_MODEL,
    Fleet,
)
from tests.serve.prometheus_server import ALERT_RULES, DASHBOARD, Prometheus, start_prometheus

pytestmark = [pytest.mark.serve, pytest.mark.slow]

SCRAPE_WAIT_S = 90


def _chat(fleet: Fleet, content: str, **extra: Any) -> httpx.Response:
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(f"{fleet.base_url}/v1/chat/completions", json=body, timeout=120)


def _ready(fleet: Fleet) -> tuple[int, dict[str, Any]]:
    reply = httpx.get(f"{fleet.base_url}/health/ready", timeout=10)
    return reply.status_code, reply.json()


# --- health and readiness ----------------------------------------------------------


def test_readiness_went_from_503_to_200_while_the_models_loaded(fleet: Fleet) -> None:
    seen = fleet.startup.readiness
    loading = [
        body
        for _, status, body in seen
        if status == 503 and body["models"][CHAT_MODEL]["state"] in ("loading", "downloading")
    ]
    assert loading, f"never saw SmolLM2 loading: {[(t, s) for t, s, _ in seen]}"
    # Serve can report the replica STARTING a moment before the replica publishes its
    # phase (with its start time): the first bodies may lack loading_for_s, later ones not.
    timed = [b["models"][CHAT_MODEL]["loading_for_s"] for b in loading]
    assert any(isinstance(t, float) for t in timed), timed
    assert loading[0]["status"] == "not_ready"
    final_status, final = seen[-1][1], seen[-1][2]
    assert final_status == 200 and final["status"] == "ready"
    assert final["models"][CHAT_MODEL]["state"] == "ready"
    assert final["models"][COMPLETION_MODEL]["state"] == "ready"
    # 503 came before 200, never after.
    codes = [status for _, status, _ in seen]
    assert codes.index(200) > codes.index(503)
    assert 503 not in codes[codes.index(200) :]


def test_a_loading_model_answered_503_with_retry_after_at_once(fleet: Fleet) -> None:
    """While six engines start on two cores, the proxy and router are starved too: the
    typical 503 must take well under a second, and none may wait for the model (which
    loads for a minute or more; a probe on a box busy with other work was seen at 5.9 s)."""
    probes = fleet.startup.loading_probes
    assert probes, "no request reached the router while SmolLM2 was loading"
    times = sorted(elapsed for elapsed, *_ in probes)
    assert times[len(times) // 2] < 1.0, times
    assert times[-1] < 10.0, times
    for _, status, retry_after, body in probes:
        assert status == 503
        assert retry_after == "15"  # the default unavailable.retry_after_s
        assert body["error"]["code"] == "model_not_ready"
        assert body["error"]["type"] == "service_unavailable"


def test_an_engine_that_cannot_start_is_failed_with_its_reason(fleet: Fleet) -> None:
    deadline = time.monotonic() + 300
    while True:
        status, body = _ready(fleet)
        broken = body["models"][BROKEN_ENGINE_MODEL]
        if broken["state"] == "failed" or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert broken["state"] == "failed", broken
    assert "max_model_len" in (broken["reason"] or ""), broken
    # min_replicas 0: it does not hold readiness back; the others stay ready.
    assert status == 200
    assert body["models"][CHAT_MODEL]["state"] == "ready"
    assert body["models"][COMPLETION_MODEL]["state"] == "ready"
    # At once: no wake, no queue. Judged like the loading probes (median under 1 s, none
    # over 5 s), as 2 shared cores sometimes stall one request for a second.
    took = []
    for _ in range(3):
        started = time.monotonic()
        refused = httpx.post(
            f"{fleet.base_url}/v1/chat/completions",
            json={"model": BROKEN_ENGINE_MODEL, "messages": [{"role": "user", "content": "Hi"}]},
            timeout=30,
        )
        took.append(time.monotonic() - started)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "model_not_ready"
    assert statistics.median(took) < 1.0 and max(took) < 5.0, took
    assert _chat(fleet, "Hi", max_tokens=2).status_code == 200
    cards = httpx.get(f"{fleet.base_url}/v1/models", timeout=10).json()["data"]
    states = {card["id"]: card.get("status") for card in cards}
    assert states[BROKEN_ENGINE_MODEL] == "failed" and states[CHAT_MODEL] == "ready"


def test_liveness_lists_every_model(fleet: Fleet) -> None:
    reply = httpx.get(f"{fleet.base_url}/health/live", timeout=10)
    assert reply.status_code == 200
    models = reply.json()["models"]
    assert models[CHAT_MODEL]["replicas"]["running"] >= 1
    assert models[BROKEN_ENGINE_MODEL]["required_for_readiness"] is False


# --- Server-Timing --------------------------------------------------------------------


def test_a_whole_answer_says_where_its_time_went(fleet: Fleet) -> None:
    reply = _chat(fleet, "What is the capital of France?", max_tokens=8, temperature=0)
    assert reply.status_code == 200
    parts = {
        name.strip(): float(value)
        for name, value in (
            entry.split(";dur=") for entry in reply.headers["server-timing"].split(",")
        )
    }
    assert set(parts) == {"routing", "queue", "engine", "total"}
    assert parts["engine"] > 0
    assert parts["total"] >= parts["engine"]
    assert abs(parts["routing"] + parts["queue"] + parts["engine"] - parts["total"]) < 1.0
    stream = _chat(fleet, "Hi", max_tokens=2, stream=True)
    assert "server-timing" not in stream.headers


# --- Prometheus -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(
    fleet: Fleet, ray_driver: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    # Ray's head writes the discovery file into its temp dir, beside the sessions.
    discovery = session.parent / "prom_metrics_service_discovery.json"
    server = start_prometheus(tmp_path_factory.mktemp("prometheus"), discovery)
    try:
        yield server
    finally:
        server.stop()


def _settled(prometheus: Prometheus, promql: str) -> float:
    """The query's value once every node is scraped and two readings 3 s apart agree
    (0 for no series: nothing counted yet)."""
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while True:
        up = prometheus.query('up{job="ray"}')
        if up and all(series["value"][1] == "1" for series in up):
            break
        assert time.monotonic() < deadline, f"Ray's nodes never scraped: {up}"
        time.sleep(1)
    time.sleep(5)  # a few scrapes of what the workers reported before now
    last = None
    while time.monotonic() < deadline:
        value = prometheus.scalar(promql) or 0.0
        if value == last:
            return value
        last = value
        time.sleep(3)
    raise AssertionError(f"{promql} did not settle")


def test_prometheus_counts_each_request_exactly_once(fleet: Fleet, prometheus: Prometheus) -> None:
    promql = (
        f'sum(ray_llm_fleet_requests_total{{model="{COMPLETION_MODEL}",'
        'endpoint="completions",status="200"})'
    )
    before = _settled(prometheus, promql)
    sent = 7
    for _ in range(sent):
        reply = httpx.post(
            f"{fleet.base_url}/v1/completions",
            json={"model": COMPLETION_MODEL, "prompt": "One", "max_tokens": 1},
            timeout=60,
        )
        assert reply.status_code == 200
    deadline = time.monotonic() + SCRAPE_WAIT_S
    value = before
    while time.monotonic() < deadline and value != before + sent:
        time.sleep(1)
        value = prometheus.scalar(promql) or 0.0
    assert value == before + sent
    time.sleep(5)  # more scrapes: still exactly once
    assert prometheus.scalar(promql) == before + sent


def _exercise_every_metric(fleet: Fleet) -> None:
    """Make each metric the dashboard queries exist: streams (TTFT, ITL), a rejection,
    a disconnect and a repeated long prompt (prefix cache hits)."""
    assert _chat(fleet, "Count to ten.", max_tokens=12, stream=True).status_code == 200
    unknown = httpx.post(
        f"{fleet.base_url}/v1/chat/completions",
        json={"model": "no-such-model", "messages": [{"role": "user", "content": "Hi"}]},
        timeout=10,
    )
    assert unknown.status_code == 404
    body = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Write a long story."}],
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{fleet.base_url}/v1/chat/completions", json=body) as reply:
        lines = reply.iter_lines()
        for _ in range(3):
            next(lines)
    shared = "The history of the river valley, told slowly. " * 40
    for _ in range(2):
        assert _chat(fleet, shared, max_tokens=2).status_code == 200


def test_every_metric_the_dashboard_and_alerts_query_is_scraped(
    fleet: Fleet, prometheus: Prometheus
) -> None:
    since = time.time() - 600
    _exercise_every_metric(fleet)
    wanted = metric_names_used(DASHBOARD, ALERT_RULES)
    deadline = time.monotonic() + SCRAPE_WAIT_S
    missing = wanted
    while time.monotonic() < deadline:
        missing = wanted - prometheus.series_names(since)
        if not missing:
            break
        time.sleep(2)
    assert not missing, f"queried by infra/ but never scraped: {sorted(missing)}"


def test_engine_metrics_are_per_model_and_replica(prometheus: Prometheus) -> None:
    result = prometheus.query("last_over_time(ray_vllm_generation_tokens_total[10m])")
    labels = [series["metric"] for series in result]
    assert {CHAT_MODEL, COMPLETION_MODEL} <= {m.get("model_name") for m in labels}
    assert all(m.get("ReplicaId") for m in labels), labels


def test_alert_rules_load_and_evaluate(prometheus: Prometheus) -> None:
    deadline = time.monotonic() + 30
    rules = prometheus.rules()
    while time.monotonic() < deadline and not all(r.get("lastEvaluation") for r in rules):
        time.sleep(1)
        rules = prometheus.rules()
    names = {rule["name"] for rule in rules}
    assert {
        "LLMFleetHighErrorRate",
        "LLMFleetTTFTP99High",
        "LLMFleetModelNotReady",
        "LLMFleetReplicasAtMax",
    } <= names
    assert all(rule["health"] == "ok" for rule in rules), rules


@pytest.mark.usefixtures("ray_driver")
def test_gateway_metrics_serves_every_queried_family_and_only_the_services(fleet: Fleet) -> None:
    """``/metrics`` on the gateway port: every metric the dashboard and alerts query, in
    a text ``prometheus-client`` parses, and none of Ray's own node families; printed:
    its size beside the node's whole text that it used to relay."""
    from prometheus_client.parser import text_string_to_metric_families

    from llm_fleet.router.node_metrics import _node_metrics_url, kept_name

    _exercise_every_metric(fleet)
    wanted = metric_names_used(DASHBOARD, ALERT_RULES)
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while True:
        reply = httpx.get(f"{fleet.base_url}/metrics", timeout=30)
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/plain")
        names = {
            sample.name
            for family in text_string_to_metric_families(reply.text)
            for sample in family.samples
        }
        missing = wanted - names
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, f"queried by infra/ but not on the gateway's /metrics: {sorted(missing)}"
    assert all(kept_name(name) for name in names), sorted(names)[:20]
    # The node's own families exist, and are left out. Ray's node agent reports them on
    # its own clock, which a busy machine can hold up: wait for them as for the rest.
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while "ray_node_" not in (node := httpx.get(_node_metrics_url(), timeout=30).text):
        assert time.monotonic() < deadline, "no ray_node_ family on the node"
        time.sleep(2)
    by_family: dict[str, int] = {}
    for line in reply.text.splitlines():
        if not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            by_family[name] = by_family.get(name, 0) + len(line) + 1
    biggest = sorted(by_family.items(), key=lambda item: -item[1])[:8]
    print(
        f"/metrics: {len(reply.content)} bytes, {len(names)} series names; "
        f"the node's whole text: {len(node.encode())} bytes; biggest: {biggest}"
    )


# --- logs -------------------------------------------------------------------------------


@pytest.mark.usefixtures("ray_driver")
def test_access_log_lines_are_json_and_carry_no_prompt_text(fleet: Fleet) -> None:
    import ray

    marker = f"zebra-{uuid.uuid4().hex}"
    request_id = f"ops-{uuid.uuid4().hex}"
    reply = httpx.post(
        f"{fleet.base_url}/v1/chat/completions",
        json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": marker}]}
        | {"max_tokens": 3},
        headers={"X-Request-Id": request_id},
        timeout=60,
    )
    assert reply.status_code == 200
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    router_logs = sorted((logs / "serve").glob("replica_fleet_router_*.log"))
    assert router_logs
    deadline = time.monotonic() + 20
    access: list[dict[str, Any]] = []
    while not access and time.monotonic() < deadline:
        time.sleep(1)
        records = [
            json.loads(line)  # every line: a JSON object, or this raises
            for path in router_logs
            for line in path.read_text().splitlines()
            if line.strip()
        ]
        access = [r for r in records if r.get("request_id") == request_id and "latency_ms" in r]
    assert len(access) == 1, access
    line = access[0]
    assert line["model"] == CHAT_MODEL and line["status"] == 200
    assert line["endpoint"] == "chat"
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] > 0
    assert line["latency_ms"] > 0
    leaked = [
        str(path)
        for path in logs.rglob("*")
        if path.is_file() and marker.encode() in path.read_bytes()
    ]
    assert not leaked, f"prompt text in logs: {leaked}"
