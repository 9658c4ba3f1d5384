"""Export a (task's) adapter as a plain PEFT LoRA folder that PEFT, vLLM and LoRAX load.

For every adapted layer the method gives its LoRA factors A (r, d_in) and B (d_out, r) with its scale
already folded into B, so the folder uses ``lora_alpha = r`` (PEFT scale 1) and no rsLoRA. Layers
may differ in rank; those go into ``rank_pattern`` / ``alpha_pattern``, as PEFT expects.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from .io import atomic_save_safetensors, atomic_write_bytes


@torch.no_grad()
def export_peft_lora(model, path, task: int | None) -> None:
    tensors, ranks, fan_in_fan_out = {}, {}, set()
    for name, layer in model.adapted_layers():
        a, b = layer.lora_factors(task)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().float()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().float()
        ranks[name] = a.shape[0]
        fan_in_fan_out.add(layer.fan_in_fan_out)
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: r for name, r in ranks.items() if r != rank}
    base_name = getattr(getattr(model.base_model, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_name,
        "r": rank,
        "lora_alpha": rank,  # scale 1: the method's scale is folded into lora_B
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out == {True},
        "target_modules": sorted(ranks),
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    atomic_write_bytes(path / "adapter_config.json", (json.dumps(config, indent=2) + "\n").encode())
