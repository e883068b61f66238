"""A small LoRA adapter for a Llama-shaped base model, made from its ``config.json``.

No package ships an adapter for the embedded models, so tests make one: PEFT's layout
(``adapter_config.json`` and ``adapter_model.safetensors``), rank 8 on ``q_proj`` and
``v_proj`` of every layer, seeded random A and B matrices (B non-zero, unlike a fresh
PEFT adapter), large enough that the adapter's greedy answer differs from the base
model's. float32, the CPU engine's dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

RANK = 8
ALPHA = 16
TARGETS = ("q_proj", "v_proj")


def make_adapter(base: Path, out: Path, seed: int = 0, scale: float = 0.15) -> Path:
    """Write an adapter for the model in ``base`` into ``out`` (created); returns ``out``."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    outputs = {"q_proj": heads * head_dim, "v_proj": kv_heads * head_dim}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(int(config["num_hidden_layers"])):
        for target in TARGETS:
            name = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            a = torch.randn(RANK, hidden, generator=generator) * scale
            b = torch.randn(outputs[target], RANK, generator=generator) * scale
            tensors[f"{name}.lora_A.weight"] = a.contiguous()
            tensors[f"{name}.lora_B.weight"] = b.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "target_modules": list(TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=1))
    return out
