"""S-LoRA-style synthetic workloads: many adapters of mixed ranks, power-law popularity.

Writes random, non-zero PEFT LoRA folders straight with safetensors (fast, no training), and
draws requests whose adapter follows a Zipf law. Knows nothing of engine internals.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraplex.model.config import ModelConfig


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    prompt_ids: list[int]
    adapter: str | None
    max_tokens: int


def write_lora_adapter(path: Path, config: ModelConfig, rank: int, target_modules: tuple[str, ...],
                       seed: int, alpha: float | None = None) -> Path:
    """A PEFT LoRA folder with random A and B (std chosen so the delta is visible)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for m in target_modules:
            d_out, d_in = config.module_shape(m)
            part = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) / d_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.02
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
        "lora_alpha": alpha if alpha is not None else 2 * rank,
        "target_modules": list(target_modules), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
    }))
    return path


def make_adapters(root: Path, config: ModelConfig, num_adapters: int, ranks: tuple[int, ...],
                  target_modules: tuple[str, ...], seed: int = 0) -> dict[str, Path]:
    """`num_adapters` folders under `root`, ranks cycling through `ranks` (reused if present)."""
    out = {}
    for i in range(num_adapters):
        rank = ranks[i % len(ranks)]
        path = root / f"adapter-{i:04d}-r{rank}"
        if not (path / "adapter_model.safetensors").exists():
            write_lora_adapter(path, config, rank, target_modules, seed=seed + i)
        out[path.name] = path
    return out


def zipf_requests(adapter_names: list[str], num_requests: int, vocab_size: int,
                  prompt_len: tuple[int, int], max_tokens: int, alpha: float = 1.0,
                  seed: int = 0) -> list[WorkloadRequest]:
    """Requests whose adapter popularity follows rank^-alpha (S-LoRA's power-law setting)."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** alpha for i in range(len(adapter_names))]
    names = rng.choices(adapter_names, weights=weights, k=num_requests)
    return [WorkloadRequest(
        prompt_ids=[rng.randrange(3, vocab_size) for _ in range(rng.randint(*prompt_len))],
        adapter=name, max_tokens=max_tokens) for name in names]
