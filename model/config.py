"""ModelConfig: the frozen base model's shape, read from a Hugging Face `config.json`.

Owns the architecture facts every layer below the scheduler needs. Imports nothing of ours.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
# Target modules an adapter may touch, in the canonical order used by every row table.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def module_indices(names: Iterable[str]) -> frozenset[int]:
    """Target module names → their indices in `TARGET_MODULES` (the row tables' module axis)."""
    return frozenset(TARGET_MODULES.index(name) for name in names)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class UnsupportedModelError(ValueError):
    """The base model's config names something we do not implement (architecture, RoPE type)."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """`"bf16"`, `"bfloat16"`, `torch.bfloat16` → `torch.bfloat16`; raises ValueError otherwise."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"dtype: unknown value {name!r}; use one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture of a Llama-family model (Llama, Mistral, Qwen2, Qwen3)."""

    model_type: str
    """`llama`, `mistral`, `qwen2` or `qwen3`."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    """q/k/v carry a bias (Qwen2 always; Llama when `attention_bias`)."""
    mlp_bias: bool
    has_qk_norm: bool
    """Per-head RMSNorm on q and k before RoPE (Qwen3)."""
    rope_scaling: dict | None = None
    """`None`, or HF's `rope_scaling` dict with `rope_type` in SUPPORTED_ROPE_TYPES."""
    sliding_window: int | None = None
    """Kept for the record; we attend over the full context (refused if shorter than the max)."""
    torch_dtype: str | None = None
    """The checkpoint's dtype name from config.json, or None."""
    eos_token_ids: tuple[int, ...] = field(default=())
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads: {self.num_kv_heads} does not divide num_heads {self.num_heads}"
            )
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_scaling type {rope_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shape(self, module: str) -> tuple[int, int]:
        """(d_out, d_in) of a target module's weight."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (self.q_size, h),
            "k_proj": (self.kv_size, h),
            "v_proj": (self.kv_size, h),
            "o_proj": (h, self.q_size),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }[module]

    @property
    def max_module_width(self) -> int:
        """Widest row any adapter matrix can have (a page must hold at least one)."""
        return max(max(self.module_shape(m)) for m in TARGET_MODULES)

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "ModelConfig":
        model_type = cfg.get("model_type", "")
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        head_dim = cfg.get("head_dim") or hidden // num_heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope_scaling = cfg.get("rope_scaling")
        rope_params = cfg.get("rope_parameters")  # transformers >= 5 folds theta in here
        rope_theta = cfg.get("rope_theta")
        if isinstance(rope_params, dict):
            rope_theta = rope_theta or rope_params.get("rope_theta")
            if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
                rope_scaling = dict(rope_params)
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            has_qk_norm=model_type == "qwen3",
            rope_scaling=rope_scaling,
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        with open(Path(path) / "config.json") as f:
            return cls.from_hf_dict(json.load(f))
