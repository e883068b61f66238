"""The gateway's /metrics focus (``router/node_metrics.py``): the service's families of a
node's Ray metrics text, parsed and written again; nothing else of the node."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from llm_fleet.router.node_metrics import focus

NODE_TEXT = """\
# HELP ray_node_cpu_utilization Total CPU usage
# TYPE ray_node_cpu_utilization gauge
ray_node_cpu_utilization{ip="127.0.0.1",SessionName="s"} 41.5
# HELP ray_llm_fleet_requests_total Requests answered by the router.
# TYPE ray_llm_fleet_requests_total counter
ray_llm_fleet_requests_total{model="m",endpoint="chat",status="200"} 7.0
ray_llm_fleet_requests_total{model="m",endpoint="chat",status="404"} 1.0
# HELP ray_vllm_time_to_first_token_seconds Histogram of time to first token.
# TYPE ray_vllm_time_to_first_token_seconds histogram
ray_vllm_time_to_first_token_seconds_bucket{model_name="m",le="0.1"} 2.0
ray_vllm_time_to_first_token_seconds_bucket{model_name="m",le="+Inf"} 3.0
ray_vllm_time_to_first_token_seconds_count{model_name="m"} 3.0
ray_vllm_time_to_first_token_seconds_sum{model_name="m"} 0.9
# HELP ray_serve_deployment_replica_healthy Whether the replica is healthy.
# TYPE ray_serve_deployment_replica_healthy gauge
ray_serve_deployment_replica_healthy{deployment="m",application="fleet"} 1.0
# HELP ray_serve_controller_control_loop_duration_s The controller's loop.
# TYPE ray_serve_controller_control_loop_duration_s gauge
ray_serve_controller_control_loop_duration_s{actor_id="a"} 0.01
# HELP ray_serve_deployment_request_counter_total Requests a replica processed.
# TYPE ray_serve_deployment_request_counter_total counter
ray_serve_deployment_request_counter_total{deployment="m",route="/"} 9.0
# HELP ray_object_store_memory Object store memory.
# TYPE ray_object_store_memory gauge
ray_object_store_memory{Location="MMAP_SHM"} 1.2e+07
"""


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_only_the_service_families_are_kept_with_every_sample_unchanged() -> None:
    focused = focus(NODE_TEXT)
    dropped = ("ray_node", "ray_object", "ray_serve_controller")
    for family in dropped:
        assert family not in focused
    kept = {k: v for k, v in _samples(NODE_TEXT).items() if not k[0].startswith(dropped)}
    request_counter = (
        "ray_serve_deployment_request_counter_total",
        (("deployment", "m"), ("route", "/")),
    )
    assert request_counter in kept
    assert _samples(focused) == kept
    assert "# TYPE ray_vllm_time_to_first_token_seconds histogram" in focused
    assert "# TYPE ray_llm_fleet_requests_total counter" in focused
    assert len(focused) < len(NODE_TEXT)


def test_an_empty_or_foreign_scrape_focuses_to_nothing() -> None:
    assert focus("") == ""
    assert (
        focus("# HELP ray_node_mem_used x\n# TYPE ray_node_mem_used gauge\nray_node_mem_used 1\n")
        == ""
    )
