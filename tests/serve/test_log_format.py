"""``LOG_FORMAT`` / ``log_format`` on the real Serve stack: the router's access line and
the model replica's lines are JSON objects with ``json`` and Serve's text lines with
``pretty``, whatever the app's ``logging_config`` says (the fake engine behind the real
router and replicas, ``tests/serve/fake_apps.py``)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import Fleet
from tests.serve.fake_apps import ONE_ROUTER, deployed, fake_model

pytestmark = [pytest.mark.serve, pytest.mark.slow]


def _is_json(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _lines(logs: Path, pattern: str) -> list[str]:
    return [
        line
        for path in sorted(logs.glob(pattern))
        for line in path.read_text().splitlines()
        if line.strip()
    ]


@pytest.mark.usefixtures("ray_driver")
@pytest.mark.parametrize("log_format", ["json", "pretty"])
def test_log_format_switches_the_router_and_replica_lines(fleet: Fleet, log_format: str) -> None:
    import ray

    app = f"log-{log_format}"
    args = {"router": ONE_ROUTER, "models": [fake_model("lf")], "log_format": log_format}
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    request_id = f"lf-{uuid.uuid4().hex}"
    with deployed(fleet.base_url, app, args, 120) as url:
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "lf", "messages": [{"role": "user", "content": "a b"}]},
            headers={"X-Request-Id": request_id},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        deadline = time.monotonic() + 20
        access: list[str] = []
        while not access and time.monotonic() < deadline:
            time.sleep(1)
            access = [
                line for line in _lines(logs, f"replica_{app}_router_*.log") if request_id in line
            ]
        model_lines = _lines(logs, f"replica_{app}_lf_*.log")
    assert len(access) == 1, access
    assert model_lines, "the model replica logged nothing"
    if log_format == "json":
        record = json.loads(access[0])
        assert record["request_id"] == request_id and record["status"] == 200
        assert all(_is_json(line) for line in model_lines), model_lines[:3]
    else:
        assert not _is_json(access[0]) and access[0].startswith("INFO"), access
        assert "chat lf 200" in access[0]
        assert not any(_is_json(line) for line in model_lines), model_lines[:3]
