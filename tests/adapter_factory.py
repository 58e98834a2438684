"""Test fixtures: tiny random-weight HF models and random, non-zero PEFT adapters saved to folders.

Stable API imported by tests across the suite: `TINY_CONFIGS`, `make_hf_model`, `save_hf_model`,
`AdapterSpec`, `make_peft_adapter`. Everything is built with transformers/peft (the oracles).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, ShiraConfig, get_peft_model

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(_TINY, model_type="llama", tie_word_embeddings=False),
    "mistral": dict(_TINY, model_type="mistral", tie_word_embeddings=False, sliding_window=None),
    "qwen2": dict(_TINY, model_type="qwen2", tie_word_embeddings=True, use_sliding_window=False),
    "qwen3": dict(_TINY, model_type="qwen3", tie_word_embeddings=False, use_sliding_window=False),
}
"""arch → kwargs of the HF config (`model_type` included): 2 layers, hidden 64, GQA 4/2 heads."""

_WEIGHT_STD = 0.05  # weights of std ~0.05 keep activations O(1) and logits far from uniform


def make_hf_model(arch: str, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """A tiny `*ForCausalLM` of `arch` with random weights; norms and biases are random too."""
    kwargs = dict(TINY_CONFIGS[arch])
    config = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.05 * noise)
            else:
                param.copy_(_WEIGHT_STD * noise)
    return model.to(dtype).eval()


def save_hf_model(model: transformers.PreTrainedModel, path: str | Path) -> Path:
    """`save_pretrained` (safetensors + config.json) into `path`; returns the folder."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    return path


@dataclass(frozen=True)
class AdapterSpec:
    """What adapter to build. `alpha` is ignored for SHiRA (its scale is 1)."""

    kind: str
    """`lora`, `rslora`, `dora`, `shira`, or `pattern` (LoRA with rank_pattern + alpha_pattern)."""
    r: int
    alpha: float
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 0


def _patterns(spec: AdapterSpec) -> tuple[dict[str, int], dict[str, float]]:
    """Rank/alpha patterns exercising both PEFT matching styles: bare suffix and dotted path."""
    targets = spec.target_modules
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    if len(targets) >= 1:
        ranks[f"model.layers.0.self_attn.{targets[0]}" if targets[0] in ALL_MODULES[:4]
              else f"model.layers.0.mlp.{targets[0]}"] = max(1, spec.r // 2)
    if len(targets) >= 2:
        ranks[targets[-1]] = spec.r * 2
        alphas[targets[-1]] = spec.alpha * 3
    if len(targets) >= 3:
        alphas[targets[1]] = spec.alpha / 2
    return ranks, alphas


def _peft_config(spec: AdapterSpec) -> LoraConfig | ShiraConfig:
    targets = list(spec.target_modules)
    if spec.kind == "shira":
        return ShiraConfig(r=spec.r, target_modules=targets, random_seed=spec.seed,
                           init_weights=False)
    if spec.kind not in ("lora", "rslora", "dora", "pattern"):
        raise ValueError(f"unknown adapter kind {spec.kind!r}")
    ranks, alphas = _patterns(spec) if spec.kind == "pattern" else ({}, {})
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=targets,
                      init_lora_weights=False, use_rslora=spec.kind == "rslora",
                      use_dora=spec.kind == "dora", rank_pattern=ranks, alpha_pattern=alphas,
                      lora_dropout=0.0)


@torch.no_grad()
def _randomise(peft_model: PeftModel, gen: torch.Generator) -> None:
    """Give every adapter module random weights whose delta is comparable to W x."""
    for _, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a = module.lora_A["default"].weight  # [r, d_in]
            b = module.lora_B["default"].weight  # [d_out, r]
            s = module.scaling["default"]
            # s * std_a * std_b * sqrt(r * d_in) ≈ std_W * sqrt(d_in)  →  delta ~ W x
            std = math.sqrt(_WEIGHT_STD / (abs(s) * math.sqrt(a.shape[0])))
            a.copy_(std * torch.randn(a.shape, generator=gen))
            b.copy_(std * torch.randn(b.shape, generator=gen))
            if "default" in getattr(module, "lora_magnitude_vector", {}):
                w = module.get_base_layer().weight
                norm = torch.linalg.norm(w + s * (b @ a), dim=1)
                mag = module.lora_magnitude_vector["default"].weight
                mag.copy_(norm * (1.0 + 0.3 * (2 * torch.rand(norm.shape, generator=gen) - 1)))
        elif hasattr(module, "shira_weight") and "default" in getattr(module, "shira_weight", {}):
            w = module.shira_weight["default"]
            w.copy_(0.1 * torch.randn(w.shape, generator=gen))


def make_peft_adapter(base_model: transformers.PreTrainedModel, spec: AdapterSpec,
                      path: str | Path) -> Path:
    """Build `spec` with peft on a deep copy of `base_model`, save it (safetensors); return folder.

    Weights are random and non-zero (B ≠ 0; DoRA magnitudes ≠ ‖W + sBA‖; SHiRA values ≠ 0), so
    adapted logits differ clearly from the base model's.
    """
    path = Path(path)
    model = copy.deepcopy(base_model).float()
    torch.manual_seed(spec.seed)
    peft_model = get_peft_model(model, _peft_config(spec))
    _randomise(peft_model, torch.Generator().manual_seed(spec.seed))
    peft_model.save_pretrained(path, safe_serialization=True)
    return path
