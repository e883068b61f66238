"""A real Hugging Face hub mirror on loopback: olah, serving git repositories offline.

Plain functions (no pytest) so Ray tests can serve a model from the mirror too::

    sha = make_mirror_repo(mirrors, "acme/tiny", model_folder)
    mirror = start_mirror(mirrors, logs)
    try:
        env = mirror.env()   # HF_ENDPOINT and friends, for os.environ or a subprocess
        ...                  # hf://acme/tiny@<sha>
    finally:
        mirror.stop()

olah (0.5.4) needs a newer FastAPI than vLLM allows, so it runs from its own venv:
``$LLM_FLEET_OLAH_CLI``, else ``<repo>/.venv-mirror/bin/olah-cli``, else ``olah-cli``
on PATH. Its mirror layout is ``<mirrors>/models/<org>/<name>``, one git repository
each (branch ``main``); a file can be stored plainly or as a git LFS pointer whose
object sits in ``.git/lfs/objects`` (made here without git-lfs).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import socket
import socketserver
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tests.weights.processes import stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
OLAH_CLI_ENV = "LLM_FLEET_OLAH_CLI"

# Fixed identity and dates: the same files always give the same commit id, and no
# user or system git config (signing, hooks, LFS filters) takes part.
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "llm-fleet tests",
    "GIT_AUTHOR_EMAIL": "tests@llm-fleet.invalid",
    "GIT_AUTHOR_DATE": "2025-01-01T00:00:00+0000",
    "GIT_COMMITTER_NAME": "llm-fleet tests",
    "GIT_COMMITTER_EMAIL": "tests@llm-fleet.invalid",
    "GIT_COMMITTER_DATE": "2025-01-01T00:00:00+0000",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}
# An uvicorn access line, as olah writes it to its log file.
_ACCESS = re.compile(
    r'"(?P<request>(?:GET|HEAD|POST|PUT|DELETE) \S+) HTTP/[\d.]+" (?P<status>\d{3})'
)


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "core.compression=0", "-c", "core.looseCompression=0", *args],
        cwd=repo,
        env={**os.environ, **_GIT_ENV},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def _lfs_pointer(path: Path, objects: Path) -> str:
    """Move ``path``'s bytes into the LFS object store; return the pointer text."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    oid, size = digest.hexdigest(), path.stat().st_size
    target = objects / oid[:2] / oid[2:4] / oid
    target.parent.mkdir(parents=True, exist_ok=True)
    path.replace(target)
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"


def mirror_repo_path(mirrors_dir: Path, repo_id: str) -> Path:
    """Where olah looks for the git repository of model ``org/name``."""
    return Path(mirrors_dir) / "models" / repo_id


def make_mirror_repo(
    mirrors_dir: Path, repo_id: str, model_folder: Path, *, lfs: Iterable[str] = ()
) -> str:
    """Commit every file of ``model_folder`` as model ``repo_id``; return the commit id.

    Files whose name matches a pattern of ``lfs`` (e.g. ``"*.safetensors"``) are stored
    as LFS pointers, as the public hub stores weights: the mirror then lists their
    sha256. Other files are plain git blobs: the mirror lists their git blob id.
    """
    repo = mirror_repo_path(mirrors_dir, repo_id)
    if repo.exists():
        raise FileExistsError(f"{repo} exists; use a new repo_id per model")
    repo.mkdir(parents=True)
    _git(repo, "init", "--quiet", "--initial-branch=main")
    patterns = tuple(lfs)
    for source in sorted(Path(model_folder).rglob("*")):
        if not source.is_file() or ".git" in source.relative_to(model_folder).parts:
            continue
        dest = repo / source.relative_to(model_folder)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        if any(fnmatch.fnmatch(dest.name, pattern) for pattern in patterns):
            dest.write_text(_lfs_pointer(dest, repo / ".git" / "lfs" / "objects"))
    if patterns:
        attributes = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in patterns)
        (repo / ".gitattributes").write_text(attributes)
    _git(repo, "add", "--all")
    _git(repo, "commit", "--quiet", "--message", f"{repo_id} for tests")
    return _git(repo, "rev-parse", "HEAD")


def olah_cli() -> Path:
    """The olah-cli executable; FileNotFoundError saying how to get one."""
    configured = os.environ.get(OLAH_CLI_ENV)
    on_path = shutil.which("olah-cli")
    for candidate in (configured, REPO_ROOT / ".venv-mirror/bin/olah-cli", on_path):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError(
        f"olah-cli not found: set {OLAH_CLI_ENV}, or create {REPO_ROOT}/.venv-mirror "
        "with olah==0.5.4 installed (it needs its own venv: a newer FastAPI than vLLM's)"
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Mirror:
    """A running olah server; ``stop()`` it when done."""

    endpoint: str
    mirrors_dir: Path
    log_dir: Path
    process: subprocess.Popen[bytes]

    def env(self) -> dict[str, str]:
        """Environment for a client of this mirror (in-process or a subprocess)."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_XET": "1",
        }

    def requests(self) -> list[str]:
        """Every request olah served, as ``"GET /path?query 200"``, oldest first."""
        # olah rotates its log hourly (olah.<hour>.log); read the rotated ones first.
        logs = sorted(self.log_dir.glob("olah*.log"), key=lambda p: p.stat().st_mtime)
        text = "".join(log.read_text(errors="replace") for log in logs)
        return [f"{m['request']} {m['status']}" for m in _ACCESS.finditer(text)]

    def request_count(self, substring: str) -> int:
        """How many served requests (method, path, query, status) contain ``substring``."""
        return sum(substring in line for line in self.requests())

    def stop(self) -> None:
        stop_process(self.process)


# Straight to loopback, whatever proxy the environment names.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _answers(endpoint: str) -> bool:
    try:
        with _DIRECT.open(f"{endpoint}/api/whoami-v2", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP status means the server is up
    except OSError:
        return False


def _launch(mirrors_dir: Path, log_dir: Path, timeout_s: float) -> Mirror | None:
    """One start on a free port; None if olah exited first (someone took the port)."""
    port = _free_port()
    config = log_dir / "olah.toml"
    config.write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f"repos-path = {json.dumps(str(log_dir / 'olah-cache'))}\n"
        f"mirrors-path = [{json.dumps(str(mirrors_dir))}]\n"
        "[accessibility]\noffline = true\n"
    )
    with (log_dir / "olah.stdout").open("ab") as output:
        process = subprocess.Popen(
            [str(olah_cli()), "--config", str(config), "--log-path", str(log_dir)],
            cwd=log_dir,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    mirror = Mirror(f"http://127.0.0.1:{port}", mirrors_dir, log_dir, process)
    deadline = time.monotonic() + timeout_s
    while not _answers(mirror.endpoint):
        if process.poll() is not None:
            return None
        if time.monotonic() > deadline:
            mirror.stop()
            raise TimeoutError(f"olah did not answer on {mirror.endpoint} in {timeout_s}s")
        time.sleep(0.2)
    return mirror


def start_mirror(mirrors_dir: Path, log_dir: Path, timeout_s: float = 60.0) -> Mirror:
    """Start olah offline on 127.0.0.1:<free port> over ``mirrors_dir``; wait until it
    answers. Its output goes to ``log_dir/olah.stdout``, its access log to ``olah.log``."""
    mirrors_dir, log_dir = Path(mirrors_dir).resolve(), Path(log_dir).resolve()
    (mirrors_dir / "models").mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    for _attempt in range(3):
        mirror = _launch(mirrors_dir, log_dir, timeout_s)
        if mirror is not None:
            return mirror
    output = (log_dir / "olah.stdout").read_text(errors="replace")[-3000:]
    raise RuntimeError(f"olah exited at start three times:\n{output}")


class EgressTrap:
    """A loopback "proxy" that records and drops every connection made to it.

    Give a client ``proxy_env()``: huggingface_hub's HTTP client then sends anything
    not bound for loopback here, so ``seen`` lists every attempt to reach, say,
    huggingface.co (as ``CONNECT huggingface.co:443 HTTP/1.1``).
    """

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _handler(self) -> type[socketserver.StreamRequestHandler]:
        seen = self.seen

        class Record(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                seen.append(self.rfile.readline(1024).decode(errors="replace").strip())

        return Record

    def proxy_env(self) -> dict[str, str]:
        url = f"http://127.0.0.1:{self.port}"
        return {
            **{name: url for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
            **{name.lower(): url for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
