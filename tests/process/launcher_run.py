"""``llm-fleet serve``'s launcher on a local cluster of its own, for this folder's runs:
a config on the fake engine, the launcher (``serve_foreground``, what ``llm-fleet serve
FILE --grace-s N`` runs once the file is valid) in the background with its log, its
readiness, and which processes of its tree outlive it.

Each run starts its own Ray cluster (loopback), so it runs with no other cluster on the
machine: ``make test`` runs this folder after the shared fleet is gone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from llm_fleet.cli.launcher import kill_tree
from llm_fleet.cli.listen import LISTEN_ENV

REPO = Path(__file__).resolve().parents[2]
TOKEN_DELAY_S = 0.05


def fake_fleet_config(port: int, token_delay_s: float = TOKEN_DELAY_S) -> dict[str, Any]:
    """A Serve config of one model ``m`` on the fake engine, on ``127.0.0.1:port``."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "fleet",
                "route_prefix": "/",
                "import_path": "tests.serve.fake_apps:build_fake_fleet",
                "args": {
                    "router": {"num_cpus": 0.05},
                    "models": [
                        {
                            "id": "m",
                            "source": "embedded://smollm2-135m-instruct",
                            "engine_args": {"token_delay_s": token_delay_s},
                            "resources": {"num_cpus": 0.05},
                            "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                        }
                    ],
                },
            }
        ],
    }


@dataclass(frozen=True)
class Launched:
    """A launcher running in the background, and the file its output goes to."""

    process: subprocess.Popen[bytes]
    log: Path


@contextmanager
def launched(
    config: Mapping[str, Any], grace_s: float, env: Mapping[str, str] | None = None
) -> Iterator[Launched]:
    """Run the launcher on ``config`` with this process's environment, less the
    listening variables, plus ``env``; kill its tree on the way out if it still runs."""
    work = Path(tempfile.mkdtemp(prefix="llm-fleet-launcher-run-"))
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(dict(config)))
    code = (
        "import sys; from llm_fleet.cli.launcher import serve_foreground; "
        f"sys.exit(serve_foreground({str(path)!r}, {grace_s}))"
    )
    mine = {k: v for k, v in os.environ.items() if k not in LISTEN_ENV}
    log = work / "launcher.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**mine, **(env or {})},
        )
    try:
        yield Launched(process, log)
    finally:
        if process.poll() is None:
            kill_tree(process.pid)


def wait_ready(
    launcher: Launched, url: str, timeout_s: float, verify: ssl.SSLContext | bool = True
) -> bool:
    """True once ``url`` answers 200; False if the launcher exits or ``timeout_s`` ends."""
    deadline = time.monotonic() + timeout_s
    while launcher.process.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2, verify=verify).status_code == 200:
                return True
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(1)
    return False


def process_tree(launcher: Launched) -> list[int]:
    """The launcher's pid and those of every process under it, now."""
    root = psutil.Process(launcher.process.pid)
    return [root.pid, *(p.pid for p in root.children(recursive=True))]


def wait_gone(
    launcher: Launched, tree: list[int], signalled: float, timeout_s: float = 300
) -> tuple[int, float, list[int]]:
    """Wait for the launcher's exit; returns its exit code, the seconds from
    ``signalled`` (``time.monotonic()``) to it, and the pids of ``tree`` still alive
    (not zombies) 2 s later."""
    code = launcher.process.wait(timeout_s)
    took_s = round(time.monotonic() - signalled, 1)
    time.sleep(2)
    left = [
        pid
        for pid in tree
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    return code, took_s, left


def report_main(doc: str, run: Callable[[], Any]) -> None:
    """A run module's ``main``: ``run()`` (a dataclass) as JSON, to ``--json PATH`` or stdout."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--json", help="write the run here as JSON (default: print it)")
    args = parser.parse_args()
    text = json.dumps(dataclasses.asdict(run()), indent=1)
    if args.json:
        Path(args.json).write_text(text)
    else:
        print(text)


def recorded_run(module: str, work: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``python -m module --json`` in a session of its own (its whole tree killed
    after it, whatever it left) and return what it wrote; fails with its log's end."""
    out, log = work / "run.json", work / "run.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", module, "--json", str(out)],
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            process.wait(timeout_s)
        finally:
            kill_tree(process.pid)
    assert out.exists(), log.read_text()[-5000:]
    recorded: dict[str, Any] = json.loads(out.read_text())
    return recorded
