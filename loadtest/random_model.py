"""The random model and adapters that `gpu_load.py` serves, written to disk: a sharded HF Llama
folder of random weights (`write_random_model`, shapes `LLAMA3_8B` and `TINY`) and PEFT LoRA
folders with random non-zero A and B, named as the trace names them (`write_adapters`).

Owns the safetensors writing (`save_safetensors`, a direct writer) and the threaded write loop
(`run_jobs`). Imports torch, `loraplex.model.config` (module shapes, `ModelConfig`) and
`loraplex.loadtest.trace` (adapter names); nothing of the engine.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from loraplex.loadtest.trace import adapter_name
from loraplex.model.config import TARGET_MODULES, ModelConfig

_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size")
LLAMA3_8B = dict(zip(_SHAPE_KEYS, (4096, 14336, 32, 32, 8, 128, 32000), strict=True))
"""Llama-3-8B but for the vocabulary (128256 there): 32000 keeps embedding and lm_head light."""
TINY = dict(zip(_SHAPE_KEYS, (64, 128, 2, 4, 2, 16, 512), strict=True))


def model_shape(is_tiny: bool, num_layers: int | None = None) -> dict:
    """`TINY` or `LLAMA3_8B`, with `num_layers` layers when given."""
    return {**(TINY if is_tiny else LLAMA3_8B),
            **({"num_hidden_layers": num_layers} if num_layers else {})}


def hf_config(shape: dict, dtype: torch.dtype) -> dict:
    return {**shape, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": str(dtype).removeprefix("torch.")}


def _parent(module: str) -> str:
    return "self_attn" if module in TARGET_MODULES[:4] else "mlp"


def _normal(shape: tuple[int, ...], std: float, dtype: torch.dtype, gen: torch.Generator
            ) -> torch.Tensor:
    """Drawn on the generator's device (fast on a GPU), handed back on the CPU for saving."""
    return torch.empty(shape, dtype=dtype, device=gen.device).normal_(0, std, generator=gen).cpu()


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The safetensors format written directly: about 4x `save_file`'s speed, and threads help
    (the writes release the GIL), which matters for 14 GB of random model."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            f.write(t.contiguous().view(torch.uint8).numpy().data)


def run_jobs(jobs: Iterator[tuple[Callable, tuple]], num_threads: int) -> None:
    """Run each (fn, args) on threads while the next is being made; 2 per thread queued."""
    with ThreadPoolExecutor(num_threads) as pool:
        pending: deque = deque()
        for fn, fn_args in jobs:
            if len(pending) >= 2 * num_threads:
                pending.popleft().result()
            pending.append(pool.submit(fn, *fn_args))
        for future in pending:
            future.result()


def _model_jobs(folder: Path, cfg: ModelConfig, dtype: torch.dtype, gen: torch.Generator,
                weight_map: dict) -> Iterator[tuple[Callable, tuple]]:
    """One shard for the embeddings, one per layer: std 0.02 weights, norms 1."""
    h = cfg.hidden_size
    shards = [[("model.embed_tokens.weight", (cfg.vocab_size, h)), ("model.norm.weight", (h,)),
               ("lm_head.weight", (cfg.vocab_size, h))]]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shards.append([(p + "input_layernorm.weight", (h,)),
                       (p + "post_attention_layernorm.weight", (h,))]
                      + [(f"{p}{_parent(m)}.{m}.weight", cfg.module_shape(m))
                         for m in TARGET_MODULES])
    for k, shard in enumerate(shards):
        file = f"model-{k:05d}.safetensors"
        tensors = {name: torch.ones(dims, dtype=dtype) if name.endswith("norm.weight")
                   else _normal(dims, 0.02, dtype, gen) for name, dims in shard}
        weight_map.update(dict.fromkeys(tensors, file))
        yield save_safetensors, (tensors, folder / file)


def write_random_model(folder: Path, shape: dict, dtype: torch.dtype, gen: torch.Generator,
                       num_threads: int) -> Path:
    """A sharded HF folder with random weights; reused when complete (it appears atomically)."""
    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config, weight_map = hf_config(shape, dtype), {}
    run_jobs(_model_jobs(tmp, ModelConfig.from_hf_dict(config), dtype, gen, weight_map),
             num_threads)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    os.replace(tmp, folder)
    return folder


def _save_adapter(path: Path, tensors: dict, rank: int, targets: tuple[str, ...]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({  # last: marks the folder complete
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False}))


def _adapter_jobs(paths: list[Path], cfg: ModelConfig, ranks: tuple[int, ...],
                  targets: tuple[str, ...], dtype: torch.dtype, gen: torch.Generator,
                  seed: int) -> Iterator[tuple[Callable, tuple]]:
    for i, path in enumerate(paths):
        if (path / "adapter_config.json").exists():
            continue
        rank, tensors = ranks[i % len(ranks)], {}
        gen.manual_seed(seed + i)
        for layer in range(cfg.num_layers):
            for m in targets:
                d_out, d_in = cfg.module_shape(m)
                key = f"base_model.model.model.layers.{layer}.{_parent(m)}.{m}"
                tensors[f"{key}.lora_A.weight"] = _normal((rank, d_in), d_in**-0.5, dtype, gen)
                tensors[f"{key}.lora_B.weight"] = _normal((d_out, rank), 0.02, dtype, gen)
        yield _save_adapter, (path, tensors, rank, targets)


def write_adapters(root: Path, cfg: ModelConfig, num_adapters: int, ranks: tuple[int, ...],
                   targets: tuple[str, ...], dtype: torch.dtype, gen: torch.Generator,
                   seed: int, num_threads: int) -> dict[str, Path]:
    """PEFT LoRA folders named as the trace names them (`adapter-0007-r64`), random non-zero A
    and B (lora_alpha 2r); complete folders are reused."""
    paths = {(name := adapter_name(i, ranks[i % len(ranks)])): root / name
             for i in range(num_adapters)}
    run_jobs(_adapter_jobs(list(paths.values()), cfg, ranks, targets, dtype, gen, seed),
             num_threads)
    return paths

