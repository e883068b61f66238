"""LoRA adapters: the schema, the allowlist, the engine args, and the router serving an
adapter under its own id on its model's replica (the fake engine answers an adapter's
requests in upper case). The real engine's answers: tests/process/test_lifecycle.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from llm_fleet.deployments.builder import load_config
from llm_fleet.deployments.config import ModelConfig
from llm_fleet.deployments.errors import ConfigError
from llm_fleet.deployments.vllm_engine import engine_kwargs
from tests.fakes import CHAT_MODEL, make_fleet


def adapter_folder(root: Path, name: str) -> str:
    folder = root / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(b"not read by the fake engine")
    return str(folder)


def model(model_id: str = "base", **fields: Any) -> dict[str, Any]:
    return {"id": model_id, "source": f"embedded://{model_id}", **fields}


@pytest.mark.parametrize(
    ("adapters", "message"),
    [
        ([{"id": "base", "source": "/a"}], "must differ"),
        ([{"id": "x", "source": "/a"}, {"id": "X", "source": "/b"}], "must differ"),
        ([{"id": "x", "source": "embedded://x"}], "s3://, hf:// or a local folder"),
        ([{"id": "x", "source": "hf://org/lora"}], "pinned commit"),
        ([{"id": "x", "source": "ftp://a"}], "source must start with"),
        ([{"id": "bad id", "source": "/a"}], "String should match pattern"),
    ],
)
def test_adapters_are_validated(adapters: list[dict[str, str]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({"models": [model(adapters=adapters)]}, {})


def test_an_adapter_id_may_not_be_another_models_id() -> None:
    models = [model(adapters=[{"id": "other", "source": "/a"}]), model("other")]
    with pytest.raises(ConfigError, match="model id 'other' is configured twice"):
        load_config({"models": models}, {})


def test_the_allowlist_names_models_and_may_narrow_their_adapters() -> None:
    adapters = [{"id": "a1", "source": "/a"}, {"id": "a2", "source": "/b"}]
    args = {"models": [model(adapters=adapters), model("other")]}

    def served(allowed: str) -> list[str]:
        config = load_config(args, {"LLM_ALLOWED_MODELS": allowed})
        return [i for m in config.models for i in [m.id, *(a.id for a in m.adapters)]]

    assert served("base") == ["base", "a1", "a2"]
    assert served("base,a2") == ["base", "a2"]
    assert served("other") == ["other"]
    with pytest.raises(ConfigError, match="adapter\\(s\\) a1 without their model 'base'"):
        served("a1")


def test_adapters_turn_on_vllm_lora_with_overridable_defaults(tmp_path: Path) -> None:
    adapters = [{"id": f"a{i}", "source": "/a"} for i in range(6)]
    config = ModelConfig.model_validate(model(adapters=adapters))
    kwargs = engine_kwargs(config, tmp_path)
    assert kwargs["enable_lora"] is True
    assert (kwargs["max_loras"], kwargs["max_lora_rank"], kwargs["max_cpu_loras"]) == (4, 16, 8)
    mine = ModelConfig.model_validate(model(adapters=adapters, engine_args={"max_lora_rank": 64}))
    assert engine_kwargs(mine, tmp_path)["max_lora_rank"] == 64
    assert "enable_lora" not in engine_kwargs(ModelConfig.model_validate(model()), tmp_path)


def test_the_router_serves_an_adapter_under_its_own_id_on_its_models_replica(
    tmp_path: Path,
) -> None:
    adapters = [
        {"id": "smol-pirate", "source": adapter_folder(tmp_path, "pirate")},
        {"id": "smol-poet", "source": adapter_folder(tmp_path, "poet")},
    ]
    fleet = make_fleet(
        model_fields={CHAT_MODEL: {"adapters": adapters, "max_adapters_per_replica": 1}}
    )
    engine = fleet.engines[CHAT_MODEL]

    def chat(model_id: str) -> dict[str, Any]:
        return {"model": model_id, "messages": [{"role": "user", "content": "ahoy there"}]}

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=fleet.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return [
                await http.get("/v1/models"),
                await http.post("/v1/chat/completions", json=chat(CHAT_MODEL)),
                await http.post("/v1/chat/completions", json=chat("smol-pirate")),
                await http.post("/v1/chat/completions", json=chat("smol-pirate")),
                await http.post("/v1/chat/completions", json=chat("smol-poet")),
                await http.post("/v1/chat/completions", json=chat("smol-unknown")),
            ]

    listed, base, pirate, again, poet, unknown = asyncio.run(scenario())
    ids = [m["id"] for m in listed.json()["data"]]
    assert {"smol-pirate", "smol-poet", CHAT_MODEL} <= set(ids)
    text = [r.json()["choices"][0]["message"]["content"] for r in (base, pirate, again, poet)]
    assert text == ["ahoy there", "AHOY THERE", "AHOY THERE", "AHOY THERE"]
    assert pirate.json()["model"] == CHAT_MODEL  # the fake names its base; vLLM the adapter
    # Loaded once, kept while used; one kept per replica: the poet replaced the pirate.
    assert engine.adapter_loads == ["smol-pirate", "smol-poet"]
    assert list(engine.adapters) == ["smol-poet"]
    assert unknown.status_code == 404
    assert [b["model"] for b in engine.bodies] == [CHAT_MODEL, *["smol-pirate"] * 2, "smol-poet"]


def test_an_api_keys_model_list_applies_to_adapter_ids(tmp_path: Path) -> None:
    from llm_fleet.router.auth import KeyRing
    from llm_fleet.router.keys_file import create_key

    adapters = [{"id": "smol-pirate", "source": adapter_folder(tmp_path, "pirate")}]
    path = tmp_path / "keys.yaml"
    base_only = create_key(path, "base-only", models=[CHAT_MODEL])
    pirate_only = create_key(path, "pirate-only", models=["smol-pirate"])
    fleet = make_fleet(
        model_fields={CHAT_MODEL: {"adapters": adapters}}, keys=KeyRing.from_file(path)
    )

    async def ask(key: str, model_id: str) -> int:
        transport = httpx.ASGITransport(app=fleet.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}]}
            headers = {"Authorization": f"Bearer {key}"}
            return (await http.post("/v1/chat/completions", json=body, headers=headers)).status_code

    async def scenario() -> list[int]:
        return [
            await ask(base_only, CHAT_MODEL),
            await ask(base_only, "smol-pirate"),
            await ask(pirate_only, "smol-pirate"),
            await ask(pirate_only, CHAT_MODEL),
        ]

    assert asyncio.run(scenario()) == [200, 404, 200, 404]
