"""The router's own ceiling: llm-fleet with a zero-cost engine against a plain Serve echo.

One ``serve run`` (the launcher's) holds two apps on the same cluster and cores
(``bench/ceiling_apps.py``): ``/fleet``, the real proxy → router → model replica stack
over the fake engine with no delay between tokens; ``/m/fake``, the same model's direct
path (proxy → model replica, no router hop); and ``/echo``, one plain Serve deployment
streaming the same frames back. A small asyncio client (aiohttp, counting
frames without parsing them, so the client is not what saturates) keeps ``c`` streaming
chat requests in flight for a fixed time against one app and then the other,
alternating by round, and prints requests/s and frames/s with the ratios fleet / echo
and direct / echo.
This separates what the router adds from what Ray Serve itself costs. The fleet app
runs the production settings of ``serve_config.local.yaml``'s router; ``--variant``
takes the same ``NAME:K=V`` edits as ``bench/serve_bench.py``.

    .venv/bin/python bench/router_ceiling.py [--seconds 20] [--rounds 3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serve_bench import RESULTS, apply_variant, free_port, parse_variant  # noqa: E402
from bench.stack_sampling import find, sampled, summarize  # noqa: E402
from llm_fleet.cli import launcher  # noqa: E402

MODEL = "fake"
PROMPT = "the quick brown fox jumps over the lazy dog"


def ceiling_config(port: int) -> dict[str, Any]:
    local = yaml.safe_load((REPO / "serve_config.local.yaml").read_text())
    fleet_args = local["applications"][0]["args"]
    model = {
        "id": MODEL,
        "source": "embedded://smollm2-135m-instruct",  # only resolved, never loaded
        "resources": {"num_cpus": 0.1},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "limits": {"default_max_tokens": 64, "max_tokens_limit": 4096},
        "max_ongoing_requests": 1000,
        "max_queued_requests": 1000,
        "direct": True,  # also at /m/fake: the direct path, measured as its own side
    }
    return {
        **{k: v for k, v in local.items() if k != "applications"},
        "http_options": {**local["http_options"], "port": port},
        "applications": [
            {
                "name": "fleet",
                "route_prefix": "/fleet",
                "import_path": "bench.ceiling_apps:build_fleet",
                "args": {**fleet_args, "models": [model]},
            },
            {
                "name": f"fleet.{MODEL}",
                "route_prefix": f"/m/{MODEL}",
                "import_path": "bench.ceiling_apps:build_direct",
                "args": {**fleet_args, "models": [model], "direct_model": MODEL},
            },
            {
                "name": "echo",
                "route_prefix": "/echo",
                "import_path": "bench.ceiling_apps:build_echo",
                "args": {"model": MODEL},
            },
        ],
    }


async def one_request(session: aiohttp.ClientSession, url: str, tokens: int) -> int:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
    }
    frames = 0
    async with session.post(url, json=body) as reply:
        if reply.status != 200:
            raise RuntimeError(f"{url}: {reply.status} {await reply.text()}")
        async for chunk in reply.content.iter_any():
            frames += chunk.count(b"data: ")
    return frames


async def load(url: str, concurrency: int, seconds: float, tokens: int) -> dict[str, float]:
    """Requests/s and frames/s with ``concurrency`` requests always in flight."""
    done = frames = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await one_request(session, url, tokens)  # warm the connection pool and the route
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()

        async def worker() -> None:
            nonlocal done, frames
            while time.perf_counter() < deadline:
                got = await one_request(session, url, tokens)  # read frames after the await
                frames += got
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"requests_per_s": done / elapsed, "frames_per_s": frames / elapsed}


def wait_ready(base: str, process: Any, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("serve run exited")
        try:
            fleet = httpx.get(f"{base}/fleet/health/ready", timeout=5).status_code == 200
            direct = httpx.get(f"{base}/m/{MODEL}/health/ready", timeout=5).status_code == 200
            echo = asyncio.run(_echo_ok(f"{base}/echo/v1/chat/completions"))
            if fleet and direct and echo:
                return
        except (httpx.HTTPError, aiohttp.ClientError, RuntimeError):
            pass
        time.sleep(2)
    raise TimeoutError("apps not ready")


async def _echo_ok(url: str) -> bool:
    async with aiohttp.ClientSession() as session:
        return await one_request(session, url, 2) > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--variant", default="", metavar="NAME:K=V,...")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the proxy, router and model replicas in round 0 at the top concurrency",
    )
    args = parser.parse_args()

    port = free_port()
    config = ceiling_config(port)
    name, settings = parse_variant(args.variant) if args.variant else ("default", {})
    config, env = apply_variant(config, settings)
    tmp = Path(tempfile.mkdtemp(prefix="llm-fleet-ceiling-"))
    path = tmp / "serve_config.ceiling.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (tmp / "serve.log").open("wb")
    process = launcher.start(
        str(path), stdout=log, stderr=log, cwd=str(REPO), env={**os.environ, **env}
    )
    base = f"http://127.0.0.1:{port}"
    sides = {
        "echo": f"{base}/echo/v1/chat/completions",
        "fleet": f"{base}/fleet/v1/chat/completions",
        "direct": f"{base}/m/{MODEL}/v1/chat/completions",
    }
    results: dict[str, dict[int, list[dict[str, float]]]] = {side: {} for side in sides}
    top = max(args.concurrency)
    # The processes each side's requests pass through (process titles).
    model_replica = f"ServeReplica:fleet.{MODEL}:{MODEL}"
    traced = {
        "fleet": ("ProxyActor", "ServeReplica:fleet:router", model_replica),
        "direct": ("ProxyActor", model_replica),
    }
    profiles = RESULTS / time.strftime("profile-%Y%m%d-%H%M%S")
    try:
        wait_ready(base, process)
        for round_no in range(args.rounds):
            order = list(sides) if round_no % 2 == 0 else list(reversed(sides))
            for level in args.concurrency:
                for side in order:
                    if args.profile and round_no == 0 and level == top and side in traced:
                        where = profiles / side
                        with sampled(find(*traced[side]), args.seconds - 2, where):
                            figures = asyncio.run(
                                load(sides[side], level, args.seconds, args.tokens)
                            )
                    else:
                        figures = asyncio.run(load(sides[side], level, args.seconds, args.tokens))
                    results[side].setdefault(level, []).append(figures)
                    print(f"round {round_no} {side:6s} c={level:<3d} {figures}", file=sys.stderr)
    finally:
        launcher.stop(process)
        log.close()

    print(
        f"router ceiling ({name}): zero-cost engine, {args.tokens} frames per request, "
        f"{args.seconds:.0f} s per level, {args.rounds} alternating rounds, medians; logs in {tmp}"
    )
    print(f"{'side':8s} {'conc':>4s} {'req/s':>10s} {'frames/s':>10s}")
    for level in args.concurrency:
        medians = {
            side: {k: statistics.median(r[k] for r in results[side][level]) for k in r0}
            for side in sides
            for r0 in [results[side][level][0]]
        }
        for side in sides:
            m = medians[side]
            print(f"{side:8s} {level:4d} {m['requests_per_s']:10.2f} {m['frames_per_s']:10.1f}")
        for side in ("fleet", "direct"):
            ratio = medians[side]["requests_per_s"] / medians["echo"]["requests_per_s"]
            print(f"{side + '/echo':12s} {level:4d} {ratio:10.3f}")
    if args.profile:
        for side in ("fleet", "direct"):
            print(f"profile of {side} at c={top} (busy samples by innermost stack part):")
            summarize(profiles / side)
        print(f"  collapsed stacks: {profiles}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / time.strftime("ceiling-%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps({"args": vars(args), "variant": settings, "results": results}))
    print(f"raw results: {out}")


if __name__ == "__main__":
    main()
