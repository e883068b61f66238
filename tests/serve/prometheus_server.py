"""A real Prometheus server (Debian package ``prometheus``) on loopback for the serve tests.

It runs ``infra/prometheus/prometheus.yml`` itself: the same Ray service discovery
file and alert rules an operator uses, with only the intervals shortened and the
paths made absolute.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.serve.conftest import REPO, free_port

INFRA = REPO / "infra"
PROMETHEUS_CONFIG = INFRA / "prometheus" / "prometheus.yml"
ALERT_RULES = INFRA / "prometheus" / "alerts.yml"
DASHBOARD = INFRA / "grafana" / "llm-fleet-dashboard.json"


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]

    def query(self, promql: str) -> list[dict[str, Any]]:
        reply = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        reply.raise_for_status()
        result: list[dict[str, Any]] = reply.json()["data"]["result"]
        return result

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def series_names(self, since: float) -> set[str]:
        """Every metric name scraped since ``since`` (epoch s), stale series included:
        Ray drops a gauge nobody refreshes (an idle engine's), and an instant query
        would miss it."""
        reply = httpx.get(
            f"{self.url}/api/v1/label/__name__/values",
            params={"start": str(since), "end": str(time.time())},
            timeout=10,
        )
        reply.raise_for_status()
        return set(reply.json()["data"])

    def rules(self) -> list[dict[str, Any]]:
        reply = httpx.get(f"{self.url}/api/v1/rules", timeout=10)
        reply.raise_for_status()
        return [rule for group in reply.json()["data"]["groups"] for rule in group["rules"]]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_prometheus(workdir: Path, discovery_file: Path) -> Prometheus:
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not installed: apt-get install prometheus")
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = "2s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(ALERT_RULES)]
    for job in config["scrape_configs"]:
        job.pop("scrape_interval", None)
        for sd in job.get("file_sd_configs", []):
            sd["files"] = [str(discovery_file)]
            sd["refresh_interval"] = "1s"
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = Prometheus(url=f"http://127.0.0.1:{port}", process=process)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError((workdir / "prometheus.log").read_text()[-3000:])
        try:
            if httpx.get(f"{server.url}/-/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise TimeoutError("prometheus did not become ready in 60 s")
