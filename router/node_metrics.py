"""``GET /metrics`` on the gateway port: the service's own metrics from this router's node.

Ray exports every metric recorded on a node (this router's, the engines' vLLM
metrics, Ray Serve's and Ray's own: about 1 MB a scrape) from that node's metrics
agent. The gateway serves only the service's families, llm-fleet's (``ray_llm_fleet_*``),
vLLM's (``ray_vllm_*``) and Ray Serve's request, queue and replica families, parsed
and written again with ``prometheus-client`` (:func:`focus`): everything the dashboard
and alerts query, and nothing of Ray's own node, object store or task families. On one
machine that is the whole service, with no Ray port opened; on a cluster, scrape every
node instead (``infra/prometheus/``): the answering router replica's node is only part
of it, and Ray's own families are there too.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from llm_fleet.router.api_errors import ServiceUnavailableError

TIMEOUT_S = 10.0
# The families the gateway's /metrics serves: all of llm-fleet's and vLLM's, and Ray
# Serve's request, queue and replica families (not its latency histograms, which
# ours and vLLM's cover, nor its controller's, proxy's and autoscaler's internals).
KEPT_PREFIXES = ("ray_llm_fleet_", "ray_vllm_")
SERVE_FAMILIES = (
    "ray_serve_deployment_request_counter",
    "ray_serve_deployment_error_counter",
    "ray_serve_num_http_requests",
    "ray_serve_num_http_error_requests",
    "ray_serve_deployment_queued_queries",
    "ray_serve_replica_processing_queries",
    "ray_serve_num_ongoing_requests_at_replicas",
    "ray_serve_deployment_replica_healthy",
    "ray_serve_deployment_replica_starts",
    "ray_serve_autoscaling_target_replicas",
)


def kept_name(name: str) -> bool:
    """Whether a sample or family name is one the gateway's /metrics serves."""
    if name.startswith(KEPT_PREFIXES):
        return True
    # A family's samples: the name itself, or it plus a suffix (_total, _bucket...).
    return any(name == f or name.startswith(f + "_") for f in SERVE_FAMILIES)


def _kept(line: str) -> bool:
    if line.startswith("#"):
        parts = line.split(maxsplit=3)  # "# HELP name text" / "# TYPE name type"
        return len(parts) >= 3 and parts[1] in ("HELP", "TYPE") and kept_name(parts[2])
    end = len(line)
    for stop in ("{", " "):
        at = line.find(stop)
        if at != -1:
            end = min(end, at)
    return kept_name(line[:end])


class _Parsed:
    """A collector that yields families parsed from a scrape, as they were."""

    def __init__(self, families: Iterable[Metric]):
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def focus(text: str) -> str:
    """The service's families of a node's metrics text (``KEPT_PREFIXES``), parsed and
    written again in the Prometheus text format. Lines of other families are dropped
    before parsing, so the cost follows what is kept."""
    kept = "\n".join(line for line in text.splitlines() if _kept(line)) + "\n"
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Parsed(text_string_to_metric_families(kept)))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def _node_metrics_url() -> str:
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    for node in nodes:
        if node.get("NodeID") == node_id:
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    raise ServiceUnavailableError("this node's metrics port is unknown")


class NodeMetrics:
    """Fetches the node's metrics text (the port is looked up once), focused on the
    service's families (:func:`focus`)."""

    def __init__(self) -> None:
        self._url: str | None = None

    async def __call__(self) -> str:
        if self._url is None:
            self._url = await asyncio.to_thread(_node_metrics_url)
        url = self._url
        return await asyncio.to_thread(lambda: focus(self._fetch(url)))

    @staticmethod
    def _fetch(url: str) -> str:
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as reply:
                return bytes(reply.read()).decode()
        except OSError as exc:
            raise ServiceUnavailableError(
                f"the node's metrics agent did not answer: {exc}"
            ) from None
