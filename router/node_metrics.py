"""``GET /metrics`` on the gateway port: the Prometheus text of this router's node.

Ray exports every metric recorded on a node (this router's, the engines' vLLM
metrics, Ray Serve's and Ray's own) from that node's metrics agent. On one machine
that is everything; the gateway relays it so a single-node user needs no Ray ports.
On a cluster, scrape every node instead (``infra/prometheus/``): the answering
router replica's node is only part of it.
"""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

from llm_fleet.router.api_errors import ServiceUnavailableError

TIMEOUT_S = 10.0


def _node_metrics_url() -> str:
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    for node in nodes:
        if node.get("NodeID") == node_id:
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    raise ServiceUnavailableError("this node's metrics port is unknown")


class NodeMetrics:
    """Fetches the node's metrics text (the port is looked up once)."""

    def __init__(self) -> None:
        self._url: str | None = None

    async def __call__(self) -> str:
        if self._url is None:
            self._url = await asyncio.to_thread(_node_metrics_url)
        return await asyncio.to_thread(self._fetch, self._url)

    @staticmethod
    def _fetch(url: str) -> str:
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as reply:
                return bytes(reply.read()).decode()
        except OSError as exc:
            raise ServiceUnavailableError(
                f"the node's metrics agent did not answer: {exc}"
            ) from None
