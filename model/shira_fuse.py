"""SHiRA's fused mode: one adapter's sparse values scattered into the frozen base weights.

When a whole batch runs one SHiRA adapter, `W + scale · S` in place costs one scatter of its
non-zeros, and the step then runs as the base model (no per-token gather; CUDA graphs apply).
The original values at those positions are saved first and written back on `restore`, so the
base weights come back bit for bit. Imports only `model.config` and `model.models.llama`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from loraplex.model.config import TARGET_MODULES
from loraplex.model.models.llama import LlamaModel

logger = logging.getLogger(__name__)

FUSE_MIN_TOKENS = 2
"""A batch this large (or the adapter already fused) makes switching to fused mode pay: the
gather path reads every non-zero once per token, the scatter writes each once per switch."""


def fusion_choice(batch: object, record: object,
                  active: tuple[object, int] | None) -> tuple[object, int] | None:
    """(record, slot) when every token of `batch` (a `scheduler.batch.Batch`) runs the one SHiRA
    adapter `record` (its first sequence's) and fusing pays: enough tokens, or it is the
    `active` fused adapter already; else None (the gather path)."""
    slots = batch.shira_token_slots
    if slots is None or batch.lora_token_slots is not None:
        return None
    slot = int(slots[0])
    if slot < 0 or not bool((slots == slot).all()):
        return None
    fused_now = active is not None and active[0] is record and active[1] == slot
    if batch.num_tokens < FUSE_MIN_TOKENS and not fused_now:
        return None
    return record, slot


@dataclass(slots=True)
class _Patch:
    flat: torch.Tensor  # the module's base weight, flattened view
    positions: torch.Tensor  # [U] int64 distinct flat positions touched
    saved: torch.Tensor  # [U] their original values


class ShiraFusion:
    """Which SHiRA adapter (if any) is fused into the model's weights, and the undo log.

    `lock` orders merges and restores against readers of the pristine weights on other threads
    (DoRA's load-time norm): `pristine_weight` must be called with it held.
    """

    def __init__(self, model: LlamaModel):
        self.model = model
        self.lock = threading.Lock()
        self.active: tuple[object, int] | None = None
        self._patches: dict[tuple[int, int], _Patch] = {}
        self.num_merges = 0

    def switch(self, key: tuple[object, int] | None, pool_flat: torch.Tensor,
               tables: object | None) -> None:
        """Make `key` = (adapter record, its row-table slot) the fused adapter (None: none)."""
        if self.active is not None and key is not None and key[0] is self.active[0] \
                and key[1] == self.active[1]:
            return
        with self.lock:
            if self.active is not None:
                self._restore()
            if key is not None:
                self._merge(key, pool_flat, tables)

    def pristine_weight(self, layer: int, module: str) -> torch.Tensor:
        """The module's base weight as loaded: a copy with the original values when fused."""
        # A snapshot either way: a merge may follow as soon as the lock is released.
        copy = self.model.base_weight(layer, module).clone()
        patch = self._patches.get((layer, TARGET_MODULES.index(module)))
        if patch is not None:
            copy.view(-1)[patch.positions] = patch.saved
        return copy

    def _merge(self, key: tuple[object, int], pool_flat: torch.Tensor, tables: object) -> None:
        slot = key[1]
        pool_i32 = pool_flat.view(torch.int32)
        counts = tables.ranks[:, :, slot].tolist()  # SHiRA's "rank" is its nnz
        for layer, row in enumerate(counts):
            for m, nnz in enumerate(row):
                if nnz > 0:
                    self._merge_module(layer, m, int(nnz), slot, pool_flat, pool_i32, tables)
        self.active = key
        self.num_merges += 1

    def _merge_module(self, layer: int, m: int, nnz: int, slot: int, pool_flat: torch.Tensor,
                      pool_i32: torch.Tensor, tables: object) -> None:
        w = self.model.base_weight(layer, TARGET_MODULES[m])
        d_out, d_in = w.shape
        width = d_in + d_out
        num_rows = -(-nnz // width)
        cols = torch.arange(width, device=pool_flat.device)

        def gather(source: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return source[(rows[:num_rows, None] + cols).flatten()[:nnz]]

        values = gather(pool_flat, tables.a_rows[layer, m, slot]).float()
        positions = gather(pool_i32, tables.b_rows[layer, m, slot]).long()
        values = values * tables.scales[layer, m, slot].float()
        unique, inverse = torch.unique(positions, return_inverse=True)
        delta = torch.zeros(unique.shape[0], dtype=torch.float32, device=values.device)
        delta.index_add_(0, inverse, values)  # duplicates add, as S's dense form would
        flat = w.view(-1)
        saved = flat[unique].clone()
        flat[unique] = (saved.float() + delta).to(flat.dtype)
        self._patches[(layer, m)] = _Patch(flat, unique, saved)

    def _restore(self) -> None:
        for patch in self._patches.values():
            patch.flat[patch.positions] = patch.saved
        self._patches.clear()
        self.active = None
