"""``make drain-check``: ``llm-fleet serve``'s drain, end to end, with one stream running.

Starts the launcher (``serve_foreground``) on the real stack over the fake engine (one
model, tokens of 50 ms), starts a stream of ``--tokens`` tokens, sends the launcher
SIGTERM, then asks for a new request. Prints what each got, how long the launcher took
to exit and whether any process of its tree is left. Run it with no other Ray cluster
on the machine (it starts its own, on loopback, port 8123).

    .venv/bin/python infra/drain_check.py --grace-s 10 --tokens 60   # the stream fits
    .venv/bin/python infra/drain_check.py --grace-s 0 --tokens 200   # ended at once
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
PORT = 8123
URL = f"http://127.0.0.1:{PORT}"
CONFIG = {
    "proxy_location": "HeadOnly",
    "http_options": {"host": "127.0.0.1", "port": PORT},
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
                        "engine_args": {"token_delay_s": 0.05},
                        "resources": {"num_cpus": 0.05},
                        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                    }
                ],
            },
        }
    ],
}


def _stream(tokens: int, out: dict[str, Any]) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "a b c"}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
    }
    started = time.monotonic()
    try:
        response = httpx.post(f"{URL}/v1/chat/completions", json=body, timeout=120)
        out.update(status=response.status_code, end=response.text[-400:])
    except httpx.HTTPError as exc:
        out.update(error=repr(exc))
    out["took_s"] = round(time.monotonic() - started, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grace-s", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=60)
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llm-fleet-drain-check-"))
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    code = (
        "import sys; from llm_fleet.cli.launcher import serve_foreground; "
        f"sys.exit(serve_foreground({str(config)!r}, {options.grace_s}))"
    )
    with (work / "launcher.log").open("w") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{URL}/health/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if launcher.poll() is not None or time.monotonic() > deadline:
            print(f"FAIL: not ready (log: {work / 'launcher.log'})")
            return 1
        time.sleep(1)
    stream: dict[str, Any] = {}
    worker = threading.Thread(target=_stream, args=(options.tokens, stream))
    worker.start()
    time.sleep(0.5)
    tree = [launcher.pid, *(p.pid for p in psutil.Process(launcher.pid).children(recursive=True))]
    signalled = time.monotonic()
    launcher.send_signal(signal.SIGTERM)
    time.sleep(0.8)
    try:
        new = httpx.post(
            f"{URL}/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        print(
            f"a new request during the drain: {new.status_code} "
            f"Retry-After={new.headers.get('retry-after')} {new.text[:160]}"
        )
    except httpx.HTTPError as exc:
        print(f"a new request during the drain: {exc!r}")
    worker.join(120)
    print(f"the stream running at SIGTERM: {stream}")
    code_ = launcher.wait(300)
    print(f"launcher exited {code_}, {time.monotonic() - signalled:.1f} s after SIGTERM")
    time.sleep(2)
    left = [
        pid
        for pid in tree
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    print(f"processes of its tree left: {left}")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
