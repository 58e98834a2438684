"""AdapterTables (where the kernels find each resident adapter's rows) and Packer (how an
adapter's rows are laid out in whole pages). Imports only torch and `model.config`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.model.config import TARGET_MODULES


@dataclass(slots=True)
class AdapterTables:
    """Row tables of the resident adapters, indexed `[layer, module, slot, ...]` on the device.

    LoRA/DoRA slots: `a_rows`/`b_rows` hold flat element offsets of A's and Bᵀ's rows, `ranks`
    the rank (0: module not adapted), `g_rows` DoRA's g row (-1: none). SHiRA slots reuse them:
    `a_rows` value rows, `b_rows` position rows (int32 units), `ranks` the number of non-zeros.
    """

    a_rows: torch.Tensor  # [L, M, S, R] int64
    b_rows: torch.Tensor  # [L, M, S, R] int64
    ranks: torch.Tensor  # [L, M, S] int64
    scales: torch.Tensor  # [L, M, S] fp32
    g_rows: torch.Tensor  # [L, M, S] int64

    @classmethod
    def empty(cls, num_layers: int, num_slots: int, max_rank: int, device: torch.device):
        shape = (num_layers, len(TARGET_MODULES), num_slots)
        return cls(
            a_rows=torch.zeros(*shape, max_rank, dtype=torch.int64, device=device),
            b_rows=torch.zeros(*shape, max_rank, dtype=torch.int64, device=device),
            ranks=torch.zeros(shape, dtype=torch.int64, device=device),
            scales=torch.zeros(shape, dtype=torch.float32, device=device),
            g_rows=torch.full(shape, -1, dtype=torch.int64, device=device),
        )


class Packer:
    """Places rows of given widths into whole pages, first fit in order (a dry run counts pages)."""

    def __init__(self, page_numel: int, align: int):
        self.page_numel, self.align = page_numel, align
        self.num_pages, self.cursor = 0, page_numel

    def place(self, num_rows: int, width: int) -> torch.Tensor:
        """[num_rows] int64 local flat offsets (local page * page_numel + offset)."""
        step = -(-width // self.align) * self.align
        if step > self.page_numel:
            raise ValueError(f"a row of {width} elements does not fit a page of {self.page_numel}")
        parts = []
        while num_rows > 0:
            fit = (self.page_numel - self.cursor) // step
            if fit == 0:
                self.num_pages, self.cursor = self.num_pages + 1, 0
                continue
            k = min(fit, num_rows)
            base = (self.num_pages - 1) * self.page_numel + self.cursor
            parts.append(base + torch.arange(k, dtype=torch.int64) * step)
            self.cursor += k * step
            num_rows -= k
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
