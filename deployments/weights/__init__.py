"""Weight sources: turn a model's ``source`` into a verified local folder vLLM loads.

- ``embedded://<id>``: converted once into the model store (``deployments/weights/embedded.py``);
- a local folder (``/abs/path`` or ``file:///abs/path``): used in place;
- ``s3://bucket/prefix``: ``s3_store.py``, into the node cache (``cache.py``);
- ``hf://org/name@revision``: ``hf_store.py`` through ``HF_ENDPOINT``, into the node cache.

Every form gets the same file-type policy (``integrity.py``): safetensors only unless
the model sets ``allow_pickle``. Remote forms are verified before the engine starts.
A local folder for vLLM's ``load_format: dummy`` (random weights, for load tests and
benchmarks of a model's shape) needs its ``config.json`` and tokenizer alone.
"""

from __future__ import annotations

from pathlib import Path

from llm_fleet.deployments.config import AdapterConfig, ModelConfig
from llm_fleet.deployments.errors import ModelPreparationError
from llm_fleet.deployments.weights import embedded
from llm_fleet.deployments.weights.cache import LoadPolicy, WeightStore, fetch_to_cache
from llm_fleet.deployments.weights.integrity import check_file_types
from llm_fleet.deployments.weights.sources import Source, parse_source


def store_for(source: Source) -> WeightStore:
    """The remote store behind an ``s3://`` or ``hf://`` source."""
    if source.scheme == "s3":
        from llm_fleet.deployments.weights.s3_store import S3Store

        return S3Store(source)
    if source.scheme == "hf":
        from llm_fleet.deployments.weights.hf_store import HFStore

        return HFStore(source)
    raise ModelPreparationError(f"{source} is not a remote source")


def resolve_weights(model: ModelConfig) -> Path:
    """Return a local folder holding ``model``'s verified weights."""
    source = parse_source(model.source)
    if source.scheme == "embedded":
        return embedded.prepare(source.location)
    dummy = model.engine_args.get("load_format") == "dummy"
    return _resolve(model, source, "config.json", "model", checked=not dummy)


def resolve_adapter(model: ModelConfig, adapter: AdapterConfig) -> Path:
    """Return a local folder holding ``adapter``'s verified files (PEFT's layout), under
    ``model``'s rules (``require_checksums``, ``allow_pickle``)."""
    return _resolve(model, parse_source(adapter.source), "adapter_config.json", "adapter")


def _resolve(
    model: ModelConfig, source: Source, marker: str, what: str, checked: bool = True
) -> Path:
    policy = LoadPolicy(allow_pickle=model.allow_pickle, require_checksums=model.require_checksums)
    if source.scheme == "local":
        folder = Path(source.location)
        if not (folder / marker).is_file():
            raise ModelPreparationError(f"{folder} holds no {what} ({marker} is missing)")
        if checked:
            names = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
            check_file_types(names, allow_pickle=policy.allow_pickle, source=str(folder))
        return folder
    return fetch_to_cache(store_for(source), source.cache_key(), policy)
