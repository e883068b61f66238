"""Where a Serve process spends its time: py-spy samples of it while a load runs.

``bench/router_ceiling.py --profile`` records the Serve proxy, the router replica and the
model replicas (py-spy, installed with Ray, in ``--nonblocking`` mode so the target is
never paused) while one side is under load, keeps the collapsed stacks under
``.bench-results/`` and prints, per process, the share of its busy samples (threads
running Python, idle threads left out) by the innermost part of the stack that matters
here: our code, Serve's request path, Ray's core worker, asyncio, starlette/uvicorn,
pickling.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

# Which processes to sample: (label, substring of the process title).
TARGETS = (
    ("serve proxy", "ProxyActor"),
    ("router replica", ":router"),
    ("model replica", "ServeReplica:"),
)
# A sample's bucket: the first of these found in its stack, innermost frame first.
BUCKETS = (
    ("pickle / serialization", ("pickle", "serializ", "cloudpickle")),
    ("llm-fleet router app", ("router/app.py", "router/sse.py", "router/accounting.py")),
    ("llm-fleet model side", ("deployments/", "router/direct.py", "fake_engine")),
    ("starlette / fastapi / uvicorn", ("starlette", "fastapi", "uvicorn", "h11")),
    ("serve request path", ("ray/serve/",)),
    ("ray core worker / grpc", ("ray/_private", "_raylet", "grpc")),
    ("asyncio loop", ("asyncio/",)),
)


def find(*titles: str) -> list[tuple[str, int]]:
    """(label, pid) of each process to sample whose title contains one of ``titles``."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        text = " ".join(proc.info["cmdline"] or [])
        if not any(title in text for title in titles):
            continue
        label = next((name for name, marker in TARGETS if marker in text), None)
        if label is not None:
            found.append((label, proc.info["pid"]))
    return found


@contextmanager
def sampled(targets: list[tuple[str, int]], seconds: float, out: Path) -> Iterator[None]:
    """Record each target with py-spy for ``seconds`` while the block runs."""
    spy = str(Path(sys.executable).with_name("py-spy"))
    out.mkdir(parents=True, exist_ok=True)
    running = []
    for label, pid in targets:
        output = out / f"{label.replace(' ', '-')}-{pid}.txt"
        argv = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds))]
        argv += ["--rate", "200", "--nonblocking", "--format", "raw", "--output", str(output)]
        running.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        yield
    finally:
        for process in running:
            process.wait(timeout=seconds + 60)


def summarize(folder: Path) -> None:
    """Per recorded process: samples and the share of each bucket (busy samples only)."""
    for path in sorted(folder.glob("*.txt")):
        shares: Counter[str] = Counter()
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            frames = stack.split(";")
            innermost = frames[-1] if frames else ""
            if any(word in innermost for word in ("select", "epoll", "poll (", "wait (")):
                shares["idle (waiting for work)"] += int(count)
                continue
            bucket = next(
                (
                    name
                    for frame in reversed(frames)
                    for name, markers in BUCKETS
                    if any(marker in frame for marker in markers)
                ),
                "other",
            )
            shares[bucket] += int(count)
        total = sum(shares.values()) or 1
        parts = ", ".join(f"{name} {n / total:.0%}" for name, n in shares.most_common(6))
        print(f"  {path.stem}: {total} samples: {parts}")
