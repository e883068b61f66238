"""Embedded models: the Gemma chunks are verified, conversion into the store is atomic
and happens once, and (slow) the real converted models generate sensible text."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from llm_fleet.deployments.errors import ModelPreparationError
from llm_fleet.deployments.weights import embedded

SMOL = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"


def test_gemma_chunks_join_into_the_verified_gguf(tmp_path: Path) -> None:
    gguf = embedded.assemble_gemma(tmp_path)
    name, expected = embedded._expected_gemma_sha256()
    assert gguf == tmp_path / name
    assert gguf.stat().st_size == sum(c.stat().st_size for c in embedded._gemma_chunks())
    content = gguf.read_bytes()
    assert hashlib.sha256(content).hexdigest() == expected
    assert content[:4] == b"GGUF"


def test_corrupted_gemma_chunk_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = list(embedded._gemma_chunks())
    corrupted = tmp_path / "corrupted" / chunks[2].name
    corrupted.parent.mkdir()
    data = bytearray(chunks[2].read_bytes())
    data[len(data) // 2] ^= 0x01
    corrupted.write_bytes(bytes(data))
    copies = [*chunks[:2], corrupted, *chunks[3:]]
    monkeypatch.setattr(embedded, "_gemma_chunks", lambda: iter(copies))
    work = tmp_path / "work"
    work.mkdir()

    with pytest.raises(ModelPreparationError, match=r"sha256 [0-9a-f]{64} does not match"):
        embedded.assemble_gemma(work)


def test_missing_gemma_chunk_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [*list(embedded._gemma_chunks())[:3], tmp_path / "gone.part03"]
    monkeypatch.setattr(embedded, "_gemma_chunks", lambda: iter(chunks))
    with pytest.raises(ModelPreparationError, match="missing Gemma chunk file"):
        embedded.assemble_gemma(tmp_path)


class FakeConverter:
    """Stands in for the slow transformers conversion; records its calls."""

    def __init__(self, *, fail: bool = False, delay_s: float = 0.0):
        self.calls: list[Path] = []
        self.fail = fail
        self.delay_s = delay_s

    def __call__(self, gguf: Path, out: Path, *, add_bos: bool) -> None:
        self.calls.append(gguf)
        out.mkdir(exist_ok=True)  # save_pretrained accepts an existing folder
        (out / "model.safetensors").write_bytes(b"half written")
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("disk full")
        (out / "config.json").write_text("{}")


@pytest.fixture
def use_converter(monkeypatch: pytest.MonkeyPatch) -> Callable[[FakeConverter], FakeConverter]:
    def install(converter: FakeConverter) -> FakeConverter:
        monkeypatch.setattr(embedded, "convert_gguf", converter)
        return converter

    return install


def test_prepare_converts_into_the_store(
    tmp_path: Path, use_converter: Callable[[FakeConverter], FakeConverter]
) -> None:
    converter = use_converter(FakeConverter())
    store = tmp_path / "store"

    folder = embedded.prepare(SMOL, store)

    assert folder == store / SMOL
    assert (folder / "config.json").is_file()
    assert embedded.is_prepared(folder)
    marker = json.loads((folder / embedded.MARKER_FILE).read_text())
    assert marker["id"] == SMOL
    assert marker["source_sha256"] == hashlib.sha256(converter.calls[0].read_bytes()).hexdigest()


def test_prepare_uses_the_store_from_the_environment(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    use_converter: Callable[[FakeConverter], FakeConverter],
) -> None:
    use_converter(FakeConverter())
    monkeypatch.setenv(embedded.MODEL_STORE_ENV, str(tmp_path))
    assert embedded.prepare(SMOL) == tmp_path / SMOL


def test_prepare_converts_only_once(
    tmp_path: Path, use_converter: Callable[[FakeConverter], FakeConverter]
) -> None:
    converter = use_converter(FakeConverter())
    first = embedded.prepare(SMOL, tmp_path)
    second = embedded.prepare(SMOL, tmp_path)
    assert first == second
    assert len(converter.calls) == 1


def test_failed_conversion_leaves_nothing_usable_and_is_retried(
    tmp_path: Path, use_converter: Callable[[FakeConverter], FakeConverter]
) -> None:
    use_converter(FakeConverter(fail=True))
    with pytest.raises(ModelPreparationError, match="disk full"):
        embedded.prepare(SMOL, tmp_path)

    assert not (tmp_path / SMOL).exists()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []
    assert not any(embedded.is_prepared(p) for p in tmp_path.rglob("*") if p.is_dir())

    converter = use_converter(FakeConverter())
    folder = embedded.prepare(SMOL, tmp_path)
    assert embedded.is_prepared(folder)
    assert (folder / "config.json").is_file()
    assert len(converter.calls) == 1


@pytest.mark.parametrize(
    "marker",
    [None, "not json", json.dumps({"format_version": embedded.FORMAT_VERSION - 1})],
)
def test_stale_or_partial_folder_is_replaced(
    tmp_path: Path,
    use_converter: Callable[[FakeConverter], FakeConverter],
    marker: str | None,
) -> None:
    old = tmp_path / SMOL
    old.mkdir()
    (old / "leftover.bin").write_bytes(b"old")
    if marker is not None:
        (old / embedded.MARKER_FILE).write_text(marker)
    converter = use_converter(FakeConverter())

    folder = embedded.prepare(SMOL, tmp_path)

    assert len(converter.calls) == 1
    assert embedded.is_prepared(folder)
    assert not (folder / "leftover.bin").exists()


def test_concurrent_prepare_converts_once(
    tmp_path: Path, use_converter: Callable[[FakeConverter], FakeConverter]
) -> None:
    converter = use_converter(FakeConverter(delay_s=0.5))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(embedded.prepare, SMOL, tmp_path) for _ in range(2)]
        results = [future.result(timeout=60) for future in futures]

    assert results == [tmp_path / SMOL] * 2
    assert len(converter.calls) == 1


def test_unknown_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelPreparationError, match="unknown embedded model 'llama'"):
        embedded.prepare("llama", tmp_path)


# --- the real converted models (slow where they are not converted yet) ---------------


def _load(model_id: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = embedded.prepare(model_id)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return tokenizer, model


def _greedy(model: Any, inputs: Any, max_new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens: list[int] = output[0][inputs["input_ids"].shape[1] :].tolist()
    return new_tokens


@pytest.mark.slow
def test_smollm2_answers_a_chat_question() -> None:
    tokenizer, model = _load(SMOL)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    answer = tokenizer.decode(_greedy(model, inputs, 20), skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_gemma_continues_a_sentence_coherently() -> None:
    tokenizer, model = _load(GEMMA)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    text = tokenizer.decode(_greedy(model, inputs, 20), skip_special_tokens=True)
    words = re.findall(r"\S+", text)
    alphabetic = [w for w in words if re.fullmatch(r"[A-Za-z][A-Za-z'\-]*[.,;:!?]?", w)]
    assert len(words) >= 5, text
    assert len(alphabetic) >= 0.8 * len(words), text
    # Without BOS this model repeats one word ("France. The The The ..."): demand variety.
    assert len({w.lower().strip(".,;:!?") for w in words}) >= 0.4 * len(words), text
    assert re.search(r"Paris|France|capital", text), text


@pytest.mark.slow
def test_gemma_tokenizer_starts_with_bos() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded.prepare(GEMMA))
    assert tokenizer("hello").input_ids[0] == 2
    assert tokenizer.bos_token_id == 2
    assert tokenizer("hello").input_ids.count(2) == 1


def test_embedded_models_are_the_ones_the_local_config_serves() -> None:
    text = (Path(__file__).resolve().parents[2] / "serve_config.local.yaml").read_text()
    assert sorted(re.findall(r"source: embedded://(\S+)", text)) == sorted(embedded.EMBEDDED_MODELS)
