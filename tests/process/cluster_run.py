"""Multi-node Ray Serve on this one machine, with the real vLLM engine.

``ray.cluster_utils.Cluster`` starts a head node (the Serve controller, the one HTTP
proxy, and the router, which reserves the head's custom resource ``gateway``) and two
worker nodes of one CPU each that advertise the custom
resource ``llm: 1``; the model's replicas reserve ``llm: 1`` (``resources.custom``) and
``max_replicas_per_node: 1``, so no node holds two. What runs, in order:

1. **Burst.** ``BURST`` streaming requests, 3x the capacity of the model at two
   replicas, sent 10 ms apart to one replica: they wait in the router's bounded queue
   (``max_queued_requests``) and the autoscaler adds a replica on the second node.
2. **Over the bound.** Once both replicas serve, ``OVERFLOW`` requests at once: the
   surplus over the bound gets an OpenAI-shaped 503 with ``Retry-After``.
3. **Node loss.** Long streams on both replicas and steady short requests; the second
   node is removed (its raylet and workers killed, ``allow_graceful=False``) while they
   run; when the streams have ended a third node joins and Serve starts the missing
   replica there.

``run_cluster`` returns what every request got and the timeline; ``make cluster-check``
prints it, ``tests/process/test_cluster.py`` checks it. It starts its own Ray cluster
(loopback, port 8127), so it runs with no other cluster on the machine: ``make test``
runs it after the shared fleet is gone.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.process.launcher_run import report_main

PORT = 8127
URL = f"http://127.0.0.1:{PORT}"
MODEL = "smollm2-135m-instruct"
SLOTS = 4  # max_ongoing_requests: requests one replica runs at once
CAPACITY = 2 * SLOTS  # max_replicas: 2
BOUND = 3 * CAPACITY  # max_queued_requests: a burst of 3x capacity waits whole
BURST = 3 * CAPACITY
OVERFLOW = BOUND + CAPACITY + 12  # at least 12 over what may run and wait
# Long enough that no admitted request ends (freeing a slot for one more) before the
# last of the OVERFLOW is sent: on a busy 2-core machine the sends spread over seconds.
OVERFLOW_TOKENS = 64
LONG_STREAMS = 4
LONG_TOKENS = 400
NODE = {"num_cpus": 1, "resources": {"llm": 1}}


def fleet_args() -> dict[str, Any]:
    """The app's args: one real model whose replicas need a node of their own."""
    return {
        "router": {
            "num_cpus": 0.1,
            # On the head: a node's loss takes its router replicas with it.
            "custom_resources": {"gateway": 0.1},
            "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        },
        "models": [
            {
                "id": MODEL,
                "source": f"embedded://{MODEL}",
                "engine_args": {
                    "max_model_len": 1024,
                    "max_num_seqs": 8,
                    "kv_cache_memory_bytes": 134217728,
                },
                "resources": {"num_cpus": 0.5, "custom": {"llm": 1}, "max_replicas_per_node": 1},
                "autoscaling": {
                    "min_replicas": 1,
                    "max_replicas": 2,
                    "target_ongoing_requests": 2,
                    "upscale_delay_s": 1,
                    # Two replicas stay while this run lasts: the count Serve restores
                    # after the node loss is the autoscaler's, not a fresh decision.
                    "downscale_delay_s": 1800,
                },
                "max_ongoing_requests": SLOTS,
                "max_queued_requests": BOUND,
            }
        ],
    }


@dataclass
class ClusterRun:
    """What each request got, where the replicas ran, and when (seconds from start)."""

    nodes: dict[str, str] = field(default_factory=dict)  # head, first, second, third -> id
    ready_at: float | None = None
    burst: list[dict[str, Any]] = field(default_factory=list)
    placement_scaled: list[str] = field(default_factory=list)  # node ids, from /health/live
    scaled_at: float | None = None
    overflow: list[dict[str, Any]] = field(default_factory=list)
    streams: list[dict[str, Any]] = field(default_factory=list)
    steady: list[dict[str, Any]] = field(default_factory=list)
    killed_at: float | None = None
    running_after_kill: int | None = None  # replicas serving while no node can take one
    third_added_at: float | None = None
    back_at: float | None = None  # two replicas serving again
    placement_back: list[str] = field(default_factory=list)
    error: str | None = None


class Clock:
    def __init__(self) -> None:
        self._start = time.monotonic()

    def now(self) -> float:
        return round(time.monotonic() - self._start, 3)


def _chat(tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }


def _stream(clock: Clock, tokens: int) -> dict[str, Any]:
    """One streaming request: status, chunks with text, tokens (from the usage chunk),
    the first chunk's and the end's time, the error frame's code and time if one came,
    whether ``[DONE]`` came."""
    out: dict[str, Any] = {"sent": clock.now(), "chunks": 0, "done": False}
    try:
        with httpx.stream(
            "POST", f"{URL}/v1/chat/completions", json=_chat(tokens, True), timeout=300
        ) as r:
            out["status"] = r.status_code
            out["retry_after"] = r.headers.get("retry-after")
            if r.status_code != 200:
                out["body"] = json.loads(r.read())
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    out["done"] = True
                elif line.startswith("data: "):
                    frame = json.loads(line.removeprefix("data: "))
                    if "error" in frame:
                        out["error_code"] = frame["error"]["code"]
                        out["error_at"] = clock.now()
                    elif frame.get("usage"):
                        out["tokens"] = frame["usage"]["completion_tokens"]
                    elif frame["choices"] and frame["choices"][0]["delta"].get("content"):
                        out["chunks"] += 1
                        out.setdefault("first_at", clock.now())
    except httpx.HTTPError as exc:
        out["exception"] = repr(exc)
    out["ended"] = clock.now()
    return out


def _placement() -> list[str]:
    """The node id of each serving replica, as the router's /health/live reports it."""
    body = httpx.get(f"{URL}/health/live", timeout=10).json()
    return sorted(p["node_id"] for p in body["models"][MODEL]["placement"])


def _running() -> int:
    return int(
        httpx.get(f"{URL}/health/live", timeout=10).json()["models"][MODEL]["replicas"]["running"]
    )


def _wait(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except (httpx.HTTPError, KeyError):
            pass  # not up yet
        time.sleep(1)
    return False


def _steady(clock: Clock, stop: threading.Event, out: list[dict[str, Any]]) -> None:
    """Short requests one after another until ``stop``: each one's status and times."""
    while not stop.is_set():
        record: dict[str, Any] = {"sent": clock.now()}
        try:
            reply = httpx.post(f"{URL}/v1/chat/completions", json=_chat(4, False), timeout=120)
            record["status"] = reply.status_code
            if reply.status_code != 200:
                record["body"] = reply.text[:400]
        except httpx.HTTPError as exc:
            record["exception"] = repr(exc)
        record["ended"] = clock.now()
        out.append(record)


def _phases(cluster: Any, run: ClusterRun, clock: Clock) -> None:
    from ray import serve

    from llm_fleet.deployments.builder import load_config
    from llm_fleet.router.builder import build_fleet

    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_fleet(load_config(fleet_args(), {})), name="fleet", blocking=False)
    if not _wait(lambda: httpx.get(f"{URL}/health/ready", timeout=5).status_code == 200, 600):
        raise RuntimeError("the fleet did not get ready")
    run.ready_at = clock.now()

    # 1. A burst of 3x capacity on one replica: every request waits its turn.
    with ThreadPoolExecutor(BURST) as pool:
        futures = []
        for _ in range(BURST):
            futures.append(pool.submit(_stream, clock, 48))
            time.sleep(0.01)
        run.burst = [f.result() for f in futures]
    if not _wait(lambda: len(set(_placement())) == 2, 600):
        raise RuntimeError("the model did not scale onto the second node")
    run.scaled_at = clock.now()
    run.placement_scaled = _placement()

    # 2. Over the bound, both replicas up: the surplus is refused at once.
    # Every thread waits at the barrier, so the sends start together.
    start = threading.Barrier(OVERFLOW)

    def overflow_one(_: int) -> dict[str, Any]:
        start.wait(60)
        return _stream(clock, OVERFLOW_TOKENS)

    with ThreadPoolExecutor(OVERFLOW) as pool:
        run.overflow = list(pool.map(overflow_one, range(OVERFLOW)))

    # 3. The second node dies under long streams and steady requests.
    stop = threading.Event()
    steady = threading.Thread(target=_steady, args=(clock, stop, run.steady))
    with ThreadPoolExecutor(LONG_STREAMS) as pool:
        futures = []
        for _ in range(LONG_STREAMS):
            futures.append(pool.submit(_stream, clock, LONG_TOKENS))
            time.sleep(0.3)
        steady.start()
        time.sleep(4)
        second = next(n for n in cluster.worker_nodes if n.node_id == run.nodes["second"])
        run.killed_at = clock.now()
        cluster.remove_node(second, allow_graceful=False)
        run.streams = [f.result() for f in futures]
    time.sleep(3)
    run.running_after_kill = _running()
    third = cluster.add_node(**NODE)
    run.nodes["third"] = third.node_id
    run.third_added_at = clock.now()
    back = _wait(
        lambda: sorted(set(_placement())) == sorted({run.nodes["first"], third.node_id}), 600
    )
    run.back_at = clock.now() if back else None
    run.placement_back = _placement()
    time.sleep(2)  # steady requests after the replica is back, too
    stop.set()
    steady.join(150)


def run_cluster() -> ClusterRun:
    """Start the cluster, run the phases, tear down only what this started."""
    from llm_fleet.cli.launcher import local_cluster_env

    os.environ.update(local_cluster_env(os.environ))
    import ray
    from ray.cluster_utils import Cluster

    run = ClusterRun()
    clock = Clock()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"gateway": 1}}
    )
    try:
        run.nodes["head"] = cluster.head_node.node_id
        run.nodes["first"] = cluster.add_node(**NODE).node_id
        run.nodes["second"] = cluster.add_node(**NODE).node_id
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        _phases(cluster, run, clock)
    except Exception as exc:  # noqa: BLE001 - the run reports what stopped it
        run.error = repr(exc)
    finally:
        # No serve.shutdown(): after a node loss it can wait forever on the controller's
        # graceful shutdown. The cluster is this run's own: stopping it stops Serve.
        ray.shutdown()
        cluster.shutdown()
    return run


def main() -> None:
    report_main(__doc__ or "", run_cluster)


if __name__ == "__main__":
    main()
