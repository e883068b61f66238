"""Prefix-affine routing against Serve's default routing, measured in the same run.

Two fleets in turn (``llm-fleet serve``, one local cluster each), the same model
(SmolLM2 on the real vLLM CPU engine, prefix caching on) at two replicas; the second
fleet's model has ``prefix_affinity.enabled``. Each gets the same workloads, streaming
chat completions sent by ``--concurrency`` clients:

- ``shared``: one system prompt of about 1,000 tokens and a different short question
  each time (the issue's case);
- ``sessions``: ``--sessions`` system prompts of about 1,000 tokens each, their
  questions interleaved (a fleet serving several long prompts at once).

For each it prints vLLM's prefix cache hit rate (``ray_vllm_prefix_cache_hits_total``
over ``..._queries_total``, in tokens, from the gateway's ``/metrics``, summed over both
replicas, before and after), how the requests split over the replicas, and the median
and p90 time to first token seen by the client; then the ratios affinity / default.
Never asserted in tests. ``make bench`` runs it.

    .venv/bin/python bench/prefix_affinity.py --requests 32 --concurrency 2
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.process.launcher_run import launched, wait_ready  # noqa: E402

PORT = 8129
URL = f"http://127.0.0.1:{PORT}"
MODEL = "smollm2-135m-instruct"
WORDS = [
    "harbour",
    "anchor",
    "tide",
    "compass",
    "lantern",
    "rigging",
    "keel",
    "mast",
    "sail",
    "rope",
    "deck",
    "cabin",
    "galley",
    "stern",
    "bow",
    "hull",
    "chart",
    "storm",
    "gull",
    "wave",
    "reef",
    "island",
    "current",
    "beacon",
]


def system_prompt(seed: int, words: int = 750) -> str:
    """About 1,000 tokens of sentences, the same for a seed."""
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"You are ship's assistant number {seed}. Ship's log follows. {text}."


def fleet_config(affinity: bool) -> dict[str, Any]:
    model = {
        "id": MODEL,
        "source": f"embedded://{MODEL}",
        "engine_args": {
            "max_model_len": 2048,
            "max_num_seqs": 8,
            "kv_cache_memory_bytes": 134217728,
            "enable_prefix_caching": True,
        },
        "resources": {"num_cpus": 0.2},
        "autoscaling": {"min_replicas": 2, "max_replicas": 2},
        "max_ongoing_requests": 8,
        "prefix_affinity": {"enabled": affinity},
    }
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": PORT},
        "applications": [
            {
                "name": "fleet",
                "route_prefix": "/",
                "import_path": "llm_fleet.router.builder:build_app",
                "args": {"router": {"num_cpus": 0.1}, "models": []},
            },
            {
                "name": f"fleet.{MODEL}",
                "route_prefix": None,
                "import_path": "llm_fleet.router.builder:build_model_app",
                "args": {"models": [model]},
            },
        ],
    }


def prefix_counters() -> dict[str, tuple[float, float]]:
    """Per replica: (prefix cache hits, queries), in tokens, from the gateway's /metrics."""
    text = httpx.get(f"{URL}/metrics", timeout=30).text
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        for index, name in enumerate(
            ("ray_vllm_prefix_cache_hits_total", "ray_vllm_prefix_cache_queries_total")
        ):
            if line.startswith(name + "{"):
                labels, value = line.rsplit(" ", 1)
                replica = labels.split('ReplicaId="', 1)[1].split('"', 1)[0]
                out.setdefault(replica, [0.0, 0.0])[index] += float(value)
    return {replica: (hits, queries) for replica, (hits, queries) in out.items()}


def ask(system: str, question: str) -> float:
    """One streamed chat; the seconds to its first content chunk."""
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    with httpx.stream("POST", f"{URL}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {") and '"content":"' in line.replace(" ", ""):
                first = time.perf_counter() - started
                for _ in lines:  # the rest of the answer
                    pass
                return first
    raise RuntimeError("no content")


def settled_counters() -> dict[str, tuple[float, float]]:
    time.sleep(6)  # Ray exports metrics every 2 s here (RAY_metrics_report_interval_ms)
    return prefix_counters()


def workload(name: str, requests: int, sessions: int) -> list[tuple[str, str]]:
    prompts = (
        [system_prompt(0)] if name == "shared" else [system_prompt(s) for s in range(sessions)]
    )
    return [
        (prompts[i % len(prompts)], f"Question {i}: what is the {WORDS[i % len(WORDS)]}?")
        for i in range(requests)
    ]


def measure(name: str, requests: int, sessions: int, concurrency: int) -> dict[str, Any]:
    before = settled_counters()
    with ThreadPoolExecutor(concurrency) as pool:
        ttfts = list(pool.map(lambda item: ask(*item), workload(name, requests, sessions)))
    after = settled_counters()
    per_replica = {
        r: (after[r][0] - before.get(r, (0, 0))[0], after[r][1] - before.get(r, (0, 0))[1])
        for r in after
    }
    hits = sum(h for h, _ in per_replica.values())
    queries = sum(q for _, q in per_replica.values())
    ttfts.sort()
    return {
        "hit_rate": hits / queries if queries else 0.0,
        "queries_by_replica": sorted(int(q) for _, q in per_replica.values()),
        "ttft_p50": statistics.median(ttfts),
        "ttft_p90": ttfts[int(0.9 * (len(ttfts) - 1))],
    }


def run_fleet(affinity: bool, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    env = {"RAY_metrics_report_interval_ms": "2000"}
    with launched(fleet_config(affinity), grace_s=0, env=env) as launcher:
        if not wait_ready(launcher, f"{URL}/health/ready", 900):
            raise RuntimeError(f"the fleet did not start: {launcher.log}")
        ask(system_prompt(99), "warm up")  # first-request costs out of the figures
        ask(system_prompt(98), "warm up")
        return {
            name: measure(name, args.requests, args.sessions, args.concurrency)
            for name in ("shared", "sessions")
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    results = {label: run_fleet(on, args) for label, on in (("default", False), ("affinity", True))}

    def ratio(w: str, key: str) -> float:
        base = results["default"][w][key]
        return float(results["affinity"][w][key] / base) if base else 0.0

    head = ("workload", "routing", "hit rate", "TTFT p50", "TTFT p90")
    print("{:10} {:9} {:>8} {:>9} {:>9}  tokens queried by replica".format(*head))
    for w in ("shared", "sessions"):
        for label in ("default", "affinity"):
            r = results[label][w]
            figures = (w, label, r["hit_rate"], r["ttft_p50"], r["ttft_p90"])
            print("{:10} {:9} {:8.1%} {:8.3f}s {:8.3f}s".format(*figures), r["queries_by_replica"])
        ratios = (w, "ratio", ratio(w, "hit_rate"), ratio(w, "ttft_p50"), ratio(w, "ttft_p90"))
        print("{:10} {:9} {:7.2f}x {:8.2f}x {:8.2f}x".format(*ratios))


if __name__ == "__main__":
    main()
