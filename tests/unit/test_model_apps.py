"""router/model_apps.py: the router follows the model apps (one Serve app per model) as
``serve deploy`` adds, changes and removes them; and the pipeline serves a followed model
from the next request on. The Serve controller is a dict here; tests/process/test_lifecycle.py
runs the same on real Serve and vLLM."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
from ray.exceptions import RaySystemError

from llm_fleet.deployments.config import ModelConfig
from llm_fleet.router.model_apps import (
    MODEL_APP_IMPORT_PATH,
    AppConfig,
    ModelAppFollower,
    found_models,
)
from tests.fake_engine import FakeEngine
from tests.fakes import CHAT_MODEL, make_fleet, replica_client


def app(model_id: str, **fields: Any) -> AppConfig:
    model = {"id": model_id, "source": f"embedded://{model_id}", **fields}
    return AppConfig(import_path=MODEL_APP_IMPORT_PATH, args={"models": [model]})


def test_only_the_fleets_model_apps_named_after_their_model_are_followed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    configs = {
        "fleet.b": app("b"),
        "fleet.c": app("not-c"),  # misnamed: warned, not served
        "other.d": app("d"),  # another fleet's
        "fleet.e": AppConfig("llm_fleet.router.builder:build_direct_app", {"models": []}),
        "fleet.f": AppConfig(MODEL_APP_IMPORT_PATH, {"models": []}),  # invalid: warned
    }
    found = found_models("fleet", configs, {})
    assert list(found) == ["b"]
    assert "model app fleet.c holds model 'not-c': name it 'fleet.not-c'" in caplog.text
    assert "model app fleet.f: invalid args" in caplog.text
    assert "exactly one model, got 0" in caplog.text


def test_the_routers_env_overrides_apply_to_a_model_apps_model() -> None:
    configs = {"fleet.b": app("b"), "fleet.c": app("c")}
    environ = {"LLM_ALLOWED_MODELS": "b,c", "LLM_MAX_TOKENS_LIMIT": "777"}
    found = found_models("fleet", configs, environ)
    assert found["b"].limits.max_tokens_limit == 777
    assert list(found_models("fleet", configs, {"LLM_ALLOWED_MODELS": "c"})) == ["c"]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.models: dict[str, ModelConfig] = {}

    def add(self, model: ModelConfig, app_name: str) -> None:
        self.calls.append(("add", app_name))
        self.models[model.id] = model

    def remove(self, model_id: str) -> None:
        self.calls.append(("remove", model_id))
        del self.models[model_id]


def test_apps_added_changed_and_removed_are_followed_reading_configs_only_on_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    recorder, reads = Recorder(), []
    configs: dict[str, AppConfig] = {}

    def read() -> dict[str, AppConfig]:
        reads.append(dict(configs))
        return dict(configs)

    follower = ModelAppFollower("fleet", {"a"}, recorder.add, recorder.remove, {}, read)

    async def scenario() -> None:
        await follower.follow({"fleet": "RUNNING", "fleet.a": "RUNNING"})  # a: the router's own
        assert reads == [] and recorder.calls == []
        configs["fleet.b"] = app("b", limits={"default_max_tokens": 8})
        await follower.follow({"fleet": "RUNNING", "fleet.b": "DEPLOYING"})
        await follower.follow({"fleet": "RUNNING", "fleet.b": "DEPLOYING"})  # no change: no read
        assert len(reads) == 1 and recorder.calls == [("add", "fleet.b")]
        await follower.follow({"fleet": "RUNNING", "fleet.b": "RUNNING"})  # read, same config
        assert len(reads) == 2 and recorder.calls == [("add", "fleet.b")]
        configs["fleet.b"] = app("b", limits={"default_max_tokens": 9})  # serve deploy: changed
        await follower.follow({"fleet": "RUNNING", "fleet.b": "DEPLOYING"})
        assert recorder.models["b"].limits.default_max_tokens == 9
        assert recorder.calls[-1] == ("add", "fleet.b")
        await follower.follow({"fleet": "RUNNING", "fleet.b": "DELETING"})  # no read needed
        assert recorder.calls[-1] == ("remove", "b") and len(reads) == 3
        await follower.follow({"fleet": "RUNNING"})
        assert recorder.models == {}

    asyncio.run(scenario())
    assert "model b (app fleet.b): now served" in caplog.text
    assert "model b (app fleet.b): config updated" in caplog.text
    assert "model b: its app is gone; no longer served" in caplog.text


def test_a_failed_read_keeps_the_models_and_is_retried(caplog: pytest.LogCaptureFixture) -> None:
    recorder, answers = Recorder(), [RaySystemError("controller away"), {"fleet.b": app("b")}]

    def read() -> dict[str, AppConfig]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    follower = ModelAppFollower("fleet", set(), recorder.add, recorder.remove, {}, read)
    apps = {"fleet": "RUNNING", "fleet.b": "RUNNING"}
    asyncio.run(follower.follow(apps))
    assert recorder.calls == []
    assert "could not read the model apps' configs from Ray Serve" in caplog.text
    asyncio.run(follower.follow(apps))  # the same statuses: read again all the same
    assert recorder.calls == [("add", "fleet.b")]


def test_a_model_added_to_the_pipeline_is_served_and_a_removed_one_is_404() -> None:
    fleet = make_fleet()
    pipeline = fleet.app.state.pipeline
    model = ModelConfig.model_validate({"id": "late", "source": "embedded://late"})
    client, _ = replica_client(model, FakeEngine("late", max_model_len=256))
    chat = {"model": "late", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

    async def scenario() -> list[Any]:
        transport = httpx.ASGITransport(app=fleet.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            before = await http.post("/v1/chat/completions", json=chat)
            pipeline.add_model(model, client)
            listed = (await http.get("/v1/models")).json()["data"]
            during = await http.post("/v1/chat/completions", json=chat)
            pipeline.remove_model("late")
            after = await http.post("/v1/chat/completions", json=chat)
            still = await http.post("/v1/chat/completions", json={**chat, "model": CHAT_MODEL})
        return [before, listed, during, after, still]

    before, listed, during, after, still = asyncio.run(scenario())
    assert before.status_code == 404
    assert "late" in [entry["id"] for entry in listed]
    assert during.status_code == 200, during.text
    assert after.status_code == 404 and after.json()["error"]["code"] == "model_not_found"
    assert still.status_code == 200


def test_an_app_that_cannot_be_followed_yet_is_retried_next_poll(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Serve lists an app a moment before its deployment exists."""
    recorder, failures = Recorder(), [KeyError("Deployment(name='b') does not exist.")]
    reads: list[int] = []

    def add(model: ModelConfig, app_name: str) -> None:
        if failures:
            raise failures.pop()
        recorder.add(model, app_name)

    def read() -> dict[str, AppConfig]:
        reads.append(1)
        return {"fleet.b": app("b")}

    follower = ModelAppFollower("fleet", set(), add, recorder.remove, {}, read)
    apps = {"fleet": "RUNNING", "fleet.b": "DEPLOYING"}
    asyncio.run(follower.follow(apps))
    assert recorder.calls == [] and "model b: could not follow its app" in caplog.text
    asyncio.run(follower.follow(apps))  # the same statuses: read and tried again
    assert recorder.calls == [("add", "fleet.b")] and len(reads) == 2
    asyncio.run(follower.follow(apps))
    assert len(reads) == 2
