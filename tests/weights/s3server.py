"""A real S3-compatible server (``moto_server``) on loopback, for tests and benchmarks.

Plain functions, usable outside pytest (``tests/serve``, ``bench/``)::

    server = start_s3_server(log_dir)
    env = {**os.environ, **server.env()}   # what boto3 in a child process needs
    server.create_bucket("llm-weights")
    ...
    server.requests("GET", "/llm-weights/smollm2/v1/model.safetensors")
    server.stop()

Requests are counted from the server's access log: werkzeug writes one line per
request, ``"GET /bucket/key?query HTTP/1.1" 206 -`` (sometimes wrapped in ANSI colours),
before it sends the response, so a count taken after a call returns includes that call.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tests.weights.processes import stop_process

# Distinctive, so a test can assert it never shows up in an error message.
ACCESS_KEY_ID = "LLMFLEETTESTKEY"
SECRET_ACCESS_KEY = "llm-fleet-test-secret-Zq7vX3kP9wR2"
REGION = "us-east-1"

_MOTO_SERVER = Path(sys.executable).parent / "moto_server"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REQUEST = re.compile(r'"(?P<method>[A-Z]+) (?P<target>\S+) HTTP/[0-9.]+" (?P<status>\d{3})')


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Request:
    """One line of the access log."""

    method: str
    path: str
    query: str
    status: int


@dataclass
class S3Server:
    """A running ``moto_server``; ``stop()`` ends it."""

    endpoint: str
    log_path: Path
    process: subprocess.Popen[bytes]
    _log: IO[bytes] = field(repr=False)

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 (in any process) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
            # Nothing from the machine's own AWS setup may leak into a test.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
        """A boto3 S3 client on this server, independent of the process environment."""
        import boto3

        return boto3.session.Session(
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
            region_name=REGION,
        ).client("s3", endpoint_url=self.endpoint)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def delete_bucket(self, name: str) -> None:
        """Delete ``name`` and every object in it (moto keeps objects in memory)."""
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=name, Key=item["Key"])
        client.delete_bucket(Bucket=name)

    def all_requests(self) -> list[Request]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            match = _REQUEST.search(_ANSI.sub("", line))
            if match:
                path, _, query = match["target"].partition("?")
                found.append(Request(match["method"], path, query, int(match["status"])))
        return found

    def requests(self, method: str, path: str) -> int:
        """How many ``method`` requests the server has answered for ``path`` (no query)."""
        return sum(1 for r in self.all_requests() if r.method == method and r.path == path)

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()


def _wait_until_answering(server: S3Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"moto_server exited with {server.process.returncode}: "
                f"{server.log_path.read_text(errors='replace')[-2000:]}"
            )
        try:
            with urllib.request.urlopen(f"{server.endpoint}/", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # an HTTP answer of any status: it is serving
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise TimeoutError(f"moto_server on {server.endpoint} did not answer in {timeout_s:.0f}s")


def start_s3_server(log_dir: Path, timeout_s: float = 30.0) -> S3Server:
    """Start ``moto_server`` on a free loopback port; its access log goes to ``log_dir``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    last_error: Exception | None = None
    for _attempt in range(3):  # another process may take the free port before moto binds it
        port = free_port()
        log_path = log_dir / f"moto-{port}.log"
        log = log_path.open("ab")  # append mode: every write lands at the end
        process = subprocess.Popen(
            [str(_MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        server = S3Server(f"http://127.0.0.1:{port}", log_path, process, log)
        try:
            _wait_until_answering(server, timeout_s)
        except RuntimeError as exc:
            server.stop()
            last_error = exc
            continue
        return server
    raise RuntimeError("moto_server did not start after 3 attempts") from last_error
