"""Soak: a fleet under steady mixed load for a long time, watched for leaks.

Starts the local fleet (``serve_config.local.yaml``, as ``make serve`` does) on a free
port, or soaks a running gateway (``--url``), and keeps ``--concurrency`` clients busy
for ``--minutes`` (30 by default) with a mix of what production sees:

- ``stream``: a streamed chat answer read to ``[DONE]`` (200);
- ``whole``: a non-streamed completion (200);
- ``leave``: a long stream the client closes after 0.5 s (a disconnect);
- ``bad``: an unknown model (404), ``max_tokens`` over the limit (400), broken JSON (400)
  or ``n: 1000`` (400), in turn;
- ``direct``: a streamed answer through SmolLM2's direct door (200).

Every ``--sample-s`` it records the RSS and open file descriptors of each Serve replica,
the Serve proxy and each vLLM engine core (psutil, this machine). At the end it waits
for the fleet to settle and reads the router's in-flight gauge from ``/metrics``.

It prints three tables (memory and descriptors per process, first and last sample;
answers per kind and status; the verdict: 5xx count, unexpected statuses, in flight at
the end) and writes the raw samples to ``.bench-results/soak-<time>.json``. It is a
benchmark, never a test: it asserts nothing, and its exit status is 1 if the verdict
shows a 5xx, an unexpected status or a request left in flight.

    .venv/bin/python bench/soak.py --minutes 30
    .venv/bin/python bench/soak.py --minutes 3 --concurrency 3   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llm_fleet.cli import launcher  # noqa: E402

RESULTS = REPO / ".bench-results"
CHAT_MODEL = "smollm2-135m-instruct"
COMPLETION_MODEL = "gemma-3-270m"
# (kind, weight): the share of requests of each kind.
MIX = (("stream", 35), ("whole", 25), ("leave", 15), ("bad", 15), ("direct", 10))
EXPECTED = {"stream": {200}, "whole": {200}, "leave": {200}, "bad": {400, 404}, "direct": {200}}
WATCHED = ("ServeReplica:", "ProxyActor", "EngineCore")
HELLO = [{"role": "user", "content": "Tell me about the sea."}]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def local_fleet(tmp: Path) -> Iterator[str]:
    """``serve_config.local.yaml`` on a free port; its base URL once ready."""
    config = yaml.safe_load((REPO / "serve_config.local.yaml").read_text())
    port = free_port()
    config["http_options"] = {**config.get("http_options", {}), "port": port}
    path = tmp / "serve_config.soak.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (tmp / "fleet.log").open("wb")
    process = launcher.start(str(path), stdout=log, stderr=log, cwd=str(REPO))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the fleet did not start; see {tmp / 'fleet.log'}")
            time.sleep(2)
        yield url
    finally:
        launcher.stop(process)
        log.close()


def sample_processes() -> dict[str, dict[str, float]]:
    """RSS (MiB) and open fds of each watched process, keyed by its title and pid."""
    seen: dict[str, dict[str, float]] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            title = " ".join(proc.info["cmdline"] or [])
            if any(marker in title for marker in WATCHED):
                name = title.split()[0] if title else str(proc.pid)
                seen[f"{name} [{proc.pid}]"] = {
                    "rss_mib": proc.memory_info().rss / 2**20,
                    "fds": float(proc.num_fds()),
                }
    return seen


async def one_request(http: httpx.AsyncClient, url: str, kind: str, turn: int) -> int:
    """Send one request of ``kind``; its HTTP status."""
    chat = f"{url}/v1/chat/completions"
    if kind in ("stream", "direct", "leave"):
        base = f"{url}/m/{CHAT_MODEL}/v1/chat/completions" if kind == "direct" else chat
        body: dict[str, Any] = {"model": CHAT_MODEL, "messages": HELLO, "stream": True}
        body |= {"max_tokens": 200, "ignore_eos": True} if kind == "leave" else {"max_tokens": 24}
        async with http.stream("POST", base, json=body) as response:
            if kind == "leave":
                await asyncio.sleep(0.5)
                return response.status_code
            text = (await response.aread()).decode()
            if response.status_code == 200 and not text.rstrip().endswith("data: [DONE]"):
                return 0  # a 200 stream that did not end with [DONE]: unexpected
            return response.status_code
    if kind == "whole":
        body = {"model": COMPLETION_MODEL, "prompt": "The sea is", "max_tokens": 12}
        return (await http.post(f"{url}/v1/completions", json=body)).status_code
    bad = turn % 4
    if bad == 0:
        response = await http.post(chat, json={"model": "no-such-model", "messages": HELLO})
    elif bad == 1:
        response = await http.post(
            chat, json={"model": CHAT_MODEL, "messages": HELLO, "max_tokens": 10**6}
        )
    elif bad == 2:
        response = await http.post(
            chat, content=b'{"model": ', headers={"Content-Type": "application/json"}
        )
    else:
        response = await http.post(chat, json={"model": CHAT_MODEL, "messages": HELLO, "n": 1000})
    return response.status_code


async def soak(url: str, args: argparse.Namespace) -> dict[str, Any]:
    kinds, weights = zip(*MIX, strict=True)
    answers: dict[str, Counter[str]] = defaultdict(Counter)
    samples: list[dict[str, Any]] = []
    end = time.monotonic() + args.minutes * 60
    turns = itertools.count()
    rng = random.Random(7)

    async def client() -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            while time.monotonic() < end:
                kind = rng.choices(kinds, weights)[0]
                try:
                    status = str(await one_request(http, url, kind, next(turns)))
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                answers[kind][status] += 1

    async def sampler() -> None:
        started = time.monotonic()
        while True:
            samples.append({"t_s": time.monotonic() - started, "procs": sample_processes()})
            if time.monotonic() >= end:
                return
            await asyncio.sleep(min(args.sample_s, max(0.0, end - time.monotonic())))

    await asyncio.gather(sampler(), *(client() for _ in range(args.concurrency)))
    await asyncio.sleep(10)  # streams closed by their clients settle
    samples.append({"t_s": samples[-1]["t_s"] + 10, "procs": sample_processes()})
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    in_flight = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("ray_llm_fleet_requests_in_flight{")
    )
    return {
        "answers": {k: dict(v) for k, v in answers.items()},
        "samples": samples,
        "in_flight_at_end": in_flight,
    }


def report(result: dict[str, Any], args: argparse.Namespace) -> bool:
    samples = result["samples"]
    # The quarter-way sample is the baseline: the first minutes fill caches and pools.
    first, warm, last = (samples[i]["procs"] for i in (0, len(samples) // 4, -1))
    print(f"\nSoak: {args.minutes} min, {args.concurrency} clients, mix {dict(MIX)}\n")
    print("| process | RSS MiB start | at 1/4 | end | end - 1/4 | fds start | 1/4 | end |")
    print("|---|---|---|---|---|---|---|---|")
    for name in sorted(set(first) | set(last)):
        seen = [p.get(name) for p in (first, warm, last)]
        rss = ["-" if x is None else f"{x['rss_mib']:.0f}" for x in seen]
        fds = ["-" if x is None else f"{x['fds']:.0f}" for x in seen]
        grew = "-"
        if seen[1] is not None and seen[2] is not None:
            grew = f"{seen[2]['rss_mib'] - seen[1]['rss_mib']:+.0f}"
        print(f"| {name} | {' | '.join(rss)} | {grew} | {' | '.join(fds)} |")
    print("\n| kind | answers by status |\n|---|---|")
    unexpected = server_errors = 0
    for kind, statuses in sorted(result["answers"].items()):
        print(f"| {kind} | {statuses} |")
        for status, count in statuses.items():
            if status.isdigit() and int(status) >= 500:
                server_errors += count
            if not status.isdigit() or int(status) not in EXPECTED[kind]:
                unexpected += count
    total = sum(sum(s.values()) for s in result["answers"].values())
    print(
        f"\n{total} requests; 5xx: {server_errors}; unexpected statuses or transport "
        f"errors: {unexpected}; in flight at the end: {result['in_flight_at_end']:g}"
    )
    return server_errors == 0 and unexpected == 0 and result["in_flight_at_end"] == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--sample-s", type=float, default=60)
    parser.add_argument("--url", help="soak this running gateway instead of starting one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp, contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(local_fleet(Path(tmp)))
        result = asyncio.run(soak(url, args))
    ok = report(result, args)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), **result}, indent=1))
    print(f"raw samples: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
