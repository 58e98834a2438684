"""The canonical form of an adapter: what every PEFT flavour becomes after parsing.

Plain tensors on the host, one entry per (layer, target module). `memory.adapters` pages these
into the pool; kernels never see these objects. Imports nothing of ours but the model config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

ModuleKey = tuple[int, str]
"""(layer index, target module name from `model.config.TARGET_MODULES`)."""


@dataclass(frozen=True, slots=True)
class LoraModule:
    """`y += scale · B(Ax)` on one module; with `row_scale` (DoRA) `y = g ⊙ (Wx + scale·BAx) + b`."""

    a: torch.Tensor
    """[rank, d_in]: A's rows."""
    b_t: torch.Tensor
    """[rank, d_out]: B transposed, so that each rank row is contiguous."""
    scale: float
    """`lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA (after alpha/rank patterns)."""
    row_scale: torch.Tensor | None = None
    """[d_out] DoRA's `g = m / ‖W + scale·BA‖` per output row (fp32 as parsed); None for plain
    LoRA."""

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True, slots=True)
class ShiraModule:
    """`y += scale · S x`, S sparse: `S[rows[k], cols[k]] = values[k]`."""

    rows: torch.Tensor
    """[nnz] int32 output-row index of each non-zero."""
    cols: torch.Tensor
    """[nnz] int32 input-column index of each non-zero."""
    values: torch.Tensor
    """[nnz] the non-zero values."""
    scale: float = 1.0

    @property
    def nnz(self) -> int:
        return self.values.shape[0]


@dataclass(frozen=True, slots=True)
class AdapterWeights:
    """A whole parsed adapter: kind plus its modules. Immutable once built."""

    kind: str
    """`lora` (rsLoRA included), `dora` or `shira`."""
    modules: dict[ModuleKey, LoraModule | ShiraModule]
    target_modules: tuple[str, ...]
    """Target module names that appear in `modules`, in canonical order."""
    source: str = ""
    """Where it was read from (a folder), for messages."""
    meta: dict = field(default_factory=dict)
    """Informational: peft_type, base model name, r, lora_alpha … as read from the config."""

    @property
    def max_rank(self) -> int:
        """Largest rank over modules (SHiRA: its PEFT `r`, 0 when absent)."""
        ranks = [m.rank for m in self.modules.values() if isinstance(m, LoraModule)]
        return max(ranks, default=int(self.meta.get("r", 0) or 0))

    def cast(self, dtype: torch.dtype) -> AdapterWeights:
        """The same adapter with its floating-point values in `dtype` (the pool's: the host tier
        then holds and copies exactly the bytes that land in the pool, rounded as they would be
        there); indices unchanged. `self` when nothing changes."""
        def to(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dtype)

        modules: dict[ModuleKey, LoraModule | ShiraModule] = {}
        for key, m in self.modules.items():
            if isinstance(m, LoraModule):
                modules[key] = replace(m, a=to(m.a), b_t=to(m.b_t), row_scale=to(m.row_scale))
            else:
                modules[key] = replace(m, values=to(m.values))
        if all(modules[k].__class__ is m.__class__ and _same(modules[k], m)
               for k, m in self.modules.items()):
            return self
        return replace(self, modules=modules)

    @property
    def num_bytes(self) -> int:
        total = 0
        for m in self.modules.values():
            if isinstance(m, LoraModule):
                total += m.a.nbytes + m.b_t.nbytes
                total += 0 if m.row_scale is None else m.row_scale.nbytes
            else:
                total += m.rows.nbytes + m.cols.nbytes + m.values.nbytes
        return total


def _same(a: LoraModule | ShiraModule, b: LoraModule | ShiraModule) -> bool:
    if isinstance(a, LoraModule):
        return a.a is b.a and a.b_t is b.b_t and a.row_scale is b.row_scale
    return a.values is b.values
