"""PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) → `AdapterWeights`.

Owns parsing and validation of every adapter from outside: each problem raises its own
`AdapterError` subclass. Never reads pickle. Imports only `model.config` and `model.adapters`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from loraplex.model.adapters.canonical import AdapterWeights, LoraModule, ModuleKey, ShiraModule
from loraplex.model.adapters.errors import (
    AdapterError,
    AdapterFormatError,
    AdapterNotFoundError,
    AdapterRankError,
    AdapterShapeError,
    UnsupportedAdapterError,
)
from loraplex.model.config import TARGET_MODULES, ModelConfig

__all__ = [
    "AdapterError",
    "AdapterFormatError",
    "AdapterNotFoundError",
    "AdapterRankError",
    "AdapterShapeError",
    "UnsupportedAdapterError",
    "load_peft_adapter",
]

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SUPPORTED_PEFT_TYPES = ("LORA", "SHIRA")
BaseWeightFn = Callable[[int, str], torch.Tensor]

# Tensor kinds PEFT saves per module; the key continues `.<kind>[.<adapter name>][.weight]`.
_TENSOR_KINDS = ("lora_A", "lora_B", "lora_magnitude_vector", "shira_weight", "shira_indices")
_MODULE_PATH = re.compile(r"(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)")
_PARENT = {m: ("self_attn" if m in TARGET_MODULES[:4] else "mlp") for m in TARGET_MODULES}

# LoraConfig fields whose truthy value changes the maths or the saved tensors; PEFT's own
# LoRA-variant flags (peft/tuners/lora/config.py, `is_lora_variant`) are all here but DoRA.
_UNSUPPORTED_LORA_OPTIONS = (
    "fan_in_fan_out", "modules_to_save", "lora_bias", "layer_replication",
    "trainable_token_indices", "target_parameters", "use_qalora", "alora_invocation_tokens",
    "velora_config", "monteclora_config", "use_bdlora", "arrow_config", "kasa_config",
    "megatron_config",
)


def load_peft_adapter(path: str | Path, config: ModelConfig, *, max_rank: int,
                      base_weight: BaseWeightFn | None = None) -> AdapterWeights:
    """Read and validate a PEFT adapter folder; tensors come back on CPU in float32.

    `base_weight(layer, module) -> W [d_out, d_in]` is needed for DoRA only (its row scale
    `g = m / ‖W + s·BA‖` is computed here, once). Raises an `AdapterError` subclass on any problem.
    """
    folder = Path(path)
    cfg = _read_config(folder)
    peft_type = cfg["peft_type"]
    tensors = _read_tensors(folder)
    groups = _group_by_module(tensors, folder, config)
    if peft_type == "SHIRA":
        _check_options(cfg, folder, ("fan_in_fan_out", "modules_to_save"))
        modules = {key: _shira_module(parts, key, config, max_rank, _Where(folder, key))
                   for key, (_, parts) in groups.items()}
        kind = "shira"
    else:
        _check_lora_options(cfg, folder)
        use_dora = bool(cfg.get("use_dora"))
        if use_dora and base_weight is None:
            raise AdapterError(f"DoRA adapter {folder}: no base weights given to compute its "
                               "magnitude row scale")
        modules = {key: _lora_module(parts, name, key, cfg, config, max_rank,
                                     base_weight if use_dora else None, _Where(folder, key))
                   for key, (name, parts) in groups.items()}
        kind = "dora" if use_dora else "lora"
    present = {m for _, m in modules}
    meta_keys = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules",
                 "base_model_name_or_path", "rank_pattern", "alpha_pattern")
    meta = {k: cfg.get(k) for k in meta_keys}
    logger.info("adapter %s: %s, %d modules, max rank %s", folder, kind, len(modules),
                max((getattr(m, "rank", 0) for m in modules.values()), default=0))
    return AdapterWeights(kind=kind, modules=dict(sorted(modules.items(), key=_order)),
                          target_modules=tuple(m for m in TARGET_MODULES if m in present),
                          source=str(folder), meta=meta)


def _order(item: tuple[ModuleKey, object]) -> tuple[int, int]:
    (layer, module), _ = item
    return layer, TARGET_MODULES.index(module)


class _Where:
    """Names a module inside an adapter folder, for error messages."""

    def __init__(self, folder: Path, key: ModuleKey) -> None:
        self.folder, self.key = folder, key

    def __str__(self) -> str:
        layer, module = self.key
        return f"layer {layer} {module} in {self.folder / WEIGHTS_FILE}"


# ---- files ---------------------------------------------------------------------------------

def _read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise AdapterNotFoundError(f"adapter folder {folder} does not exist")
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise AdapterNotFoundError(f"adapter folder {folder} has no {CONFIG_FILE}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{cfg_path} is not valid json: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{cfg_path} must hold a json object, got {type(cfg).__name__}")
    peft_type = cfg.get("peft_type")
    if not isinstance(peft_type, str):
        raise AdapterFormatError(f"{cfg_path} has no peft_type")
    if peft_type.upper() not in SUPPORTED_PEFT_TYPES:
        raise UnsupportedAdapterError(
            f"adapter {folder}: peft_type {peft_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_PEFT_TYPES)}")
    cfg["peft_type"] = peft_type.upper()
    return cfg


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        if (folder / "adapter_model.bin").exists():
            raise AdapterFormatError(f"adapter {folder} has only adapter_model.bin: "
                                     f"{WEIGHTS_FILE} is required (pickle is never loaded)")
        raise AdapterNotFoundError(f"adapter folder {folder} has no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise AdapterFormatError(f"{weights} is not a readable safetensors file: {e}") from None
    if not tensors:
        raise AdapterFormatError(f"{weights} holds no tensors")
    return tensors


def _check_options(cfg: dict, folder: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if cfg.get(name):
            raise UnsupportedAdapterError(
                f"adapter {folder}: option {name}={cfg[name]!r} is not supported")


def _check_lora_options(cfg: dict, folder: Path) -> None:
    _check_options(cfg, folder, _UNSUPPORTED_LORA_OPTIONS)
    if cfg.get("bias", "none") not in ("none", None):
        raise UnsupportedAdapterError(
            f"adapter {folder}: bias={cfg['bias']!r} is not supported (only 'none')")
    if cfg.get("use_rslora") and (cfg.get("rank_pattern") or cfg.get("alpha_pattern")):
        # PEFT refuses this combination too (peft/tuners/lora/model.py).
        raise UnsupportedAdapterError(
            f"adapter {folder}: use_rslora with rank_pattern/alpha_pattern is not supported")
    for name in ("r", "lora_alpha"):
        value = cfg.get(name)
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not is_number or not math.isfinite(value):
            raise AdapterFormatError(
                f"{folder / CONFIG_FILE}: {name} must be a number, got {value!r}")


# ---- keys ----------------------------------------------------------------------------------

def _split_key(key: str, folder: Path) -> tuple[str, str]:
    """`base_model.model.X.lora_A[.name].weight` → (`X`, `lora_A`); refuses anything else."""
    parts = key.split(".")
    idx = next((i for i, p in enumerate(parts) if p in _TENSOR_KINDS), None)
    if idx is None or idx == 0:
        raise UnsupportedAdapterError(
            f"tensor {key!r} in {folder / WEIGHTS_FILE} is not a LoRA/DoRA/SHiRA weight "
            "(modules_to_save, bias or trainable tokens are not supported)")
    kind, tail = parts[idx], parts[idx + 1:]
    if tail and tail[-1] == "bias":
        raise UnsupportedAdapterError(f"tensor {key!r} in {folder / WEIGHTS_FILE}: "
                                      "LoRA biases (lora_bias) are not supported")
    if tail and tail[-1] == "weight":
        tail = tail[:-1]
    if len(tail) > 1:
        raise AdapterFormatError(f"tensor key {key!r} in {folder / WEIGHTS_FILE} is malformed")
    module_path = ".".join(parts[:idx]).removeprefix("base_model.model.")
    return module_path, kind


def _module_key(module_path: str, folder: Path, config: ModelConfig) -> ModuleKey:
    match = _MODULE_PATH.fullmatch(module_path)
    module = match.group(3) if match else module_path.rsplit(".", 1)[-1]
    if not match or module not in TARGET_MODULES or _PARENT[module] != match.group(2):
        raise AdapterShapeError(
            f"adapter {folder} targets {module_path!r}, which is not a supported module of the "
            f"base model (supported: {', '.join(TARGET_MODULES)} in each decoder layer)")
    layer = int(match.group(1))
    if layer >= config.num_layers:
        raise AdapterShapeError(f"adapter {folder} targets {module_path!r}, but the base model "
                                f"has {config.num_layers} layers")
    return layer, module


def _group_by_module(tensors: dict[str, torch.Tensor], folder: Path,
                     config: ModelConfig) -> dict[ModuleKey, tuple[str, dict[str, torch.Tensor]]]:
    """(layer, module) → (PEFT module path, {tensor kind: tensor})."""
    groups: dict[ModuleKey, tuple[str, dict[str, torch.Tensor]]] = {}
    for key in sorted(tensors):
        module_path, kind = _split_key(key, folder)
        mkey = _module_key(module_path, folder, config)
        _, parts = groups.setdefault(mkey, (module_path, {}))
        if kind in parts:
            raise AdapterFormatError(f"{folder / WEIGHTS_FILE}: {kind} of {module_path!r} appears "
                                     "twice (several adapters in one file are not supported)")
        parts[kind] = tensors[key]
    return groups


# ---- modules -------------------------------------------------------------------------------

def _float(t: torch.Tensor, name: str, where: _Where) -> torch.Tensor:
    if not t.is_floating_point():
        raise AdapterFormatError(f"{name} of {where} has dtype {t.dtype}; floats expected")
    t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise AdapterFormatError(f"{name} of {where} has non-finite values (nan/inf)")
    return t


def _require(parts: dict[str, torch.Tensor], names: tuple[str, ...], allowed: tuple[str, ...],
             where: _Where) -> None:
    for name in names:
        if name not in parts:
            raise AdapterFormatError(f"{where}: {name} is missing "
                                     f"(found {', '.join(sorted(parts))})")
    extra = sorted(set(parts) - set(allowed))
    if extra:
        raise AdapterFormatError(f"{where}: unexpected tensors {', '.join(extra)} for this "
                                 "adapter type")


def _get_pattern_key(pattern_keys: list[str], key_to_match: str) -> str:
    """Mirror of `peft.utils.other.get_pattern_key`: first pattern matching a dotted suffix."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def _rank_and_alpha(cfg: dict, module_path: str, where: _Where) -> tuple[int, float]:
    """r and alpha PEFT gives this module (peft/tuners/lora/model.py `_create_and_replace`)."""
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise AdapterFormatError(f"{where}: rank_pattern/alpha_pattern must be json objects")
    try:
        r = rank_pattern.get(_get_pattern_key(list(rank_pattern), module_path), cfg["r"])
        alpha = alpha_pattern.get(_get_pattern_key(list(alpha_pattern), module_path),
                                  cfg["lora_alpha"])
    except re.error as e:
        raise AdapterFormatError(f"{where}: bad regex in rank/alpha pattern: {e}") from None
    if not isinstance(r, int) or isinstance(r, bool) or not isinstance(alpha, int | float):
        raise AdapterFormatError(f"{where}: rank {r!r} / alpha {alpha!r} from the config "
                                 "must be numbers")
    return r, float(alpha)


def _lora_module(parts: dict[str, torch.Tensor], module_path: str, key: ModuleKey, cfg: dict,
                 config: ModelConfig, max_rank: int, base_weight: BaseWeightFn | None,
                 where: _Where) -> LoraModule:
    is_dora = base_weight is not None
    need = ("lora_A", "lora_B", "lora_magnitude_vector") if is_dora else ("lora_A", "lora_B")
    _require(parts, need, need, where)
    a = _float(parts["lora_A"], "lora_A", where)  # [r, d_in]
    b = _float(parts["lora_B"], "lora_B", where)  # [d_out, r]
    d_out, d_in = config.module_shape(key[1])
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != d_in or b.shape[0] != d_out \
            or a.shape[0] != b.shape[1]:
        raise AdapterShapeError(
            f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
            f"module [d_out={d_out}, d_in={d_in}] (expected A [r, {d_in}], B [{d_out}, r])")
    rank = a.shape[0]
    r, alpha = _rank_and_alpha(cfg, module_path, where)
    if rank != r:
        raise AdapterShapeError(f"{where}: tensors have rank {rank} but the config "
                                f"(r / rank_pattern) says {r}")
    if rank < 1:
        raise AdapterFormatError(f"{where}: rank must be positive, got {rank}")
    if rank > max_rank:
        raise AdapterRankError(f"{where}: rank {rank} is above the maximum rank {max_rank}")
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    row_scale = None
    if is_dora:
        magnitude = _float(parts["lora_magnitude_vector"], "lora_magnitude_vector", where)
        if tuple(magnitude.shape) != (d_out,):
            raise AdapterShapeError(f"{where}: lora_magnitude_vector has shape "
                                    f"{tuple(magnitude.shape)}, expected ({d_out},)")
        row_scale = dora_row_scale(base_weight(*key), a, b, scale, magnitude)
        if not torch.isfinite(row_scale).all():
            raise AdapterFormatError(f"{where}: DoRA row scale is not finite "
                                     "(‖W + s·BA‖ is zero on some row)")
    return LoraModule(a=a.contiguous(), b_t=b.t().contiguous(), scale=scale, row_scale=row_scale)


def dora_row_scale(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                   magnitude: torch.Tensor) -> torch.Tensor:
    """g = m / ‖W + s·BA‖ per output row, in fp32, without materialising BA.

    ‖W_j + s·(BA)_j‖² = ‖W_j‖² + 2s·(W Aᵀ)_j·B_j + s²·B_j (A Aᵀ) B_jᵀ (clamped ≥ 0). PEFT takes
    the same norm, detached, in the activation dtype (peft/tuners/lora/dora.py `get_weight_norm`).
    weight: [d_out, d_in] (any device/dtype); a: [r, d_in]; b: [d_out, r]; magnitude: [d_out].
    Returns [d_out] fp32 on CPU.
    """
    w = weight.detach().to(torch.float32)
    a = a.to(w.device, torch.float32)
    b = b.to(w.device, torch.float32)
    if tuple(w.shape) != (b.shape[0], a.shape[1]):
        raise AdapterShapeError(f"base weight {tuple(w.shape)} does not match the adapter's "
                                f"[{b.shape[0]}, {a.shape[1]}]")
    w_sq = (w * w).sum(dim=1)  # [d_out]
    cross = ((w @ a.t()) * b).sum(dim=1)  # [d_out]
    quad = ((b @ (a @ a.t())) * b).sum(dim=1)  # [d_out]
    norm = (w_sq + 2.0 * scale * cross + scale * scale * quad).clamp_min(0.0).sqrt()
    return (magnitude.to(w.device, torch.float32) / norm).cpu()


def _shira_module(parts: dict[str, torch.Tensor], key: ModuleKey, config: ModelConfig,
                  max_rank: int, where: _Where) -> ShiraModule:
    need = ("shira_weight", "shira_indices")
    _require(parts, need, need, where)
    values = _float(parts["shira_weight"], "shira_weight", where)  # [nnz]
    indices = parts["shira_indices"]  # [2, nnz]: row, col
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise AdapterFormatError(f"{where}: shira_indices has dtype {indices.dtype}; "
                                 "integers expected")
    if values.ndim != 1 or indices.ndim != 2 or indices.shape[0] != 2 \
            or indices.shape[1] != values.shape[0]:
        raise AdapterShapeError(f"{where}: shira_indices {tuple(indices.shape)} and shira_weight "
                                f"{tuple(values.shape)} must be [2, nnz] and [nnz]")
    d_out, d_in = config.module_shape(key[1])
    nnz = values.shape[0]
    if nnz > max_rank * (d_in + d_out):
        raise AdapterRankError(f"{where}: {nnz} non-zeros exceed max_rank {max_rank} × "
                               f"(d_in + d_out) = {max_rank * (d_in + d_out)}")
    rows, cols = indices[0].to(torch.int64), indices[1].to(torch.int64)
    if nnz and (rows.min() < 0 or cols.min() < 0 or rows.max() >= d_out or cols.max() >= d_in):
        raise AdapterShapeError(f"{where}: shira_indices out of range for the base module "
                                f"[d_out={d_out}, d_in={d_in}]")
    rows, cols, values = _coalesce(rows, cols, values, d_in)
    return ShiraModule(rows=rows.to(torch.int32), cols=cols.to(torch.int32),
                       values=values.contiguous(), scale=1.0)


def _coalesce(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
              d_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum repeated (row, col) entries, as PEFT's `torch.sparse_coo_tensor` delta does."""
    flat = rows * d_in + cols  # [nnz]
    uniq, inverse = torch.unique(flat, return_inverse=True)
    if uniq.numel() == flat.numel():
        return rows, cols, values
    summed = torch.zeros(uniq.numel(), dtype=values.dtype).index_add_(0, inverse, values)
    return uniq // d_in, uniq % d_in, summed
