"""Soak: a fleet under steady mixed load for a long time, watched for leaks.

Starts the local fleet (``serve_config.local.yaml``, as ``make serve`` does) on a free
port, or soaks a running gateway (``--url``), for ``--minutes`` (30 by default) with a
mix of what production sees, at ``--load`` (0.7) of the fleet's capacity:

1. **Capacity** is measured first, in the same run: ``--calibrate-clients`` (16) clients
   send the mix back to back for ``--calibrate-s`` (90 s); the answers per second they
   get is the capacity (more clients only queue: each model runs 16 sequences at most).
2. **The soak** then sends the mix open loop, as independent users do: arrivals at
   random (Poisson) times at ``load`` x capacity per second, each request on its own
   whatever the others are doing. ``--concurrency N`` runs N closed-loop clients
   instead, with no calibration (the older mode).

The mix:

- ``stream``: a streamed chat answer read to ``[DONE]`` (200);
- ``whole``: a non-streamed completion (200);
- ``leave``: a long stream the client closes after 0.5 s (a disconnect);
- ``bad``: an unknown model (404), ``max_tokens`` over the limit (400), broken JSON (400)
  or ``n: 1000`` (400), in turn;
- ``direct``: a streamed answer through SmolLM2's direct door (200).

Every ``--sample-s`` it records the RSS and open file descriptors of each Serve replica,
the Serve proxy and each vLLM engine core (psutil, this machine). At the end it waits
for the fleet to settle and reads the router's in-flight gauge from ``/metrics``.

It prints the load (capacity, offered and achieved rates, the most requests in flight
at once) and three tables (memory and descriptors per process, first and last sample;
answers per kind and status; the verdict: 5xx count, unexpected statuses, in flight at
the end) and writes the raw samples to ``.bench-results/soak-<time>.json``. It is a
benchmark, never a test: it asserts nothing, and its exit status is 1 if the verdict
shows a 5xx, an unexpected status or a request left in flight.

    .venv/bin/python bench/soak.py --minutes 30
    .venv/bin/python bench/soak.py --minutes 3 --calibrate-s 30   # a quick look
    .venv/bin/python bench/soak.py --minutes 3 --concurrency 3    # closed loop
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


KINDS: list[str] = [kind for kind, _ in MIX]
WEIGHTS: list[int] = [weight for _, weight in MIX]


class Sender:
    """Sends requests of the mix and counts their answers by kind and status."""

    def __init__(self, url: str, seed: int) -> None:
        self.url = url
        self.rng = random.Random(seed)
        self.turns = itertools.count()
        self.answers: dict[str, Counter[str]] = defaultdict(Counter)
        self.in_flight = self.most_in_flight = 0

    async def send(self, http: httpx.AsyncClient) -> None:
        kind = self.rng.choices(KINDS, WEIGHTS)[0]
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            status = str(await one_request(http, self.url, kind, next(self.turns)))
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        finally:
            self.in_flight -= 1
        self.answers[kind][status] += 1

    def total(self) -> int:
        return sum(sum(statuses.values()) for statuses in self.answers.values())

    async def closed_loop(self, clients: int, end: float) -> None:
        """``clients`` clients, each sending its next request when its last is answered."""

        async def client() -> None:
            async with httpx.AsyncClient(timeout=120) as http:
                while time.monotonic() < end:
                    await self.send(http)

        await asyncio.gather(*(client() for _ in range(clients)))

    async def open_loop(self, rate: float, end: float) -> None:
        """Requests at Poisson arrival times, ``rate`` per second on average, each sent
        on arrival whatever is in flight; then waits for the last answers."""
        sent: set[asyncio.Task[None]] = set()
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            while (now := time.monotonic()) < end:
                await asyncio.sleep(min(self.rng.expovariate(rate), end - now))
                task = asyncio.create_task(self.send(http))
                sent.add(task)
                task.add_done_callback(sent.discard)
            await asyncio.gather(*sent)


async def capacity(url: str, args: argparse.Namespace) -> float:
    """Answers per second of the mix with ``calibrate_clients`` clients back to back."""
    sender = Sender(url, seed=11)
    started = time.monotonic()
    await sender.closed_loop(args.calibrate_clients, started + args.calibrate_s)
    rate = sender.total() / (time.monotonic() - started)
    print(
        f"capacity: {rate:.2f} answers/s with {args.calibrate_clients} clients "
        f"back to back for {args.calibrate_s:g} s ({dict(sender.answers)})",
        flush=True,
    )
    return rate


async def soak(url: str, args: argparse.Namespace) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    load: dict[str, Any] = {"mode": "closed", "clients": args.concurrency}
    if args.concurrency is None:
        measured = await capacity(url, args)
        load = {"mode": "open", "capacity_per_s": measured, "offered_per_s": args.load * measured}
    sender = Sender(url, seed=7)
    started = time.monotonic()
    end = started + args.minutes * 60

    async def sampler() -> None:
        started = time.monotonic()
        while True:
            samples.append({"t_s": time.monotonic() - started, "procs": sample_processes()})
            if time.monotonic() >= end:
                return
            await asyncio.sleep(min(args.sample_s, max(0.0, end - time.monotonic())))

    if load["mode"] == "open":
        traffic = sender.open_loop(load["offered_per_s"], end)
    else:
        traffic = sender.closed_loop(args.concurrency, end)
    await asyncio.gather(sampler(), traffic)
    load["achieved_per_s"] = sender.total() / (time.monotonic() - started)
    load["most_in_flight"] = sender.most_in_flight
    await asyncio.sleep(10)  # streams closed by their clients settle
    samples.append({"t_s": samples[-1]["t_s"] + 10, "procs": sample_processes()})
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    in_flight = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("ray_llm_fleet_requests_in_flight{")
    )
    return {
        "load": load,
        "answers": {k: dict(v) for k, v in sender.answers.items()},
        "samples": samples,
        "in_flight_at_end": in_flight,
    }


def by_pid(samples: list[dict[str, Any]]) -> list[dict[str, dict[str, float]]]:
    """Each sample's processes keyed by one name per pid: Ray retitles an actor's process
    while it runs a method (``ray::ProxyActor.receive_asgi_messages``), so the shortest
    title seen for a pid names it in every sample."""
    names: dict[str, str] = {}
    for sample in samples:
        for key in sample["procs"]:
            name, pid = key.rsplit(" ", 1)
            if pid not in names or len(name) < len(names[pid]):
                names[pid] = name
    return [
        {
            f"{names[key.rsplit(' ', 1)[1]]} {key.rsplit(' ', 1)[1]}": v
            for key, v in s["procs"].items()
        }
        for s in samples
    ]


def report(result: dict[str, Any], args: argparse.Namespace) -> bool:
    samples = by_pid(result["samples"])
    # The quarter-way sample is the baseline: the first minutes fill caches and pools.
    first, warm, last = (samples[i] for i in (0, len(samples) // 4, -1))
    load = result["load"]
    if load["mode"] == "open":
        shown = (
            f"open loop at {args.load:.0%} of a measured capacity of "
            f"{load['capacity_per_s']:.2f} answers/s: {load['offered_per_s']:.2f}/s offered, "
            f"{load['achieved_per_s']:.2f}/s answered, at most {load['most_in_flight']} in flight"
        )
    else:
        shown = f"{load['clients']} clients back to back, {load['achieved_per_s']:.2f} answers/s"
    print(f"\nSoak: {args.minutes:g} min, {shown}; mix {dict(MIX)}\n")
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
    parser.add_argument("--load", type=float, default=0.7, help="share of the capacity")
    parser.add_argument("--calibrate-s", type=float, default=90)
    parser.add_argument("--calibrate-clients", type=int, default=16)
    parser.add_argument(
        "--concurrency", type=int, help="N closed-loop clients instead (no calibration)"
    )
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
