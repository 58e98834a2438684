"""KV pages: the layout of K/V inside a pool page and one sequence's page table."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from loraplex.memory.pool import PagePool, PageUse


@dataclass(frozen=True, slots=True)
class KVLayout:
    """A KV page = `[num_layers, 2 (K, V), page_size, num_kv_heads, head_dim]` elements."""

    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int

    @property
    def page_numel(self) -> int:
        return self.num_layers * 2 * self.page_size * self.num_kv_heads * self.head_dim

    def num_pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def caches(self, pool: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k_cache, v_cache), each a strided view `[num_pages, page_size, H_kv, D]`."""
        view = pool.view(
            pool.shape[0], self.num_layers, 2, self.page_size, self.num_kv_heads, self.head_dim
        )
        return [(view[:, layer, 0], view[:, layer, 1]) for layer in range(self.num_layers)]


@dataclass(slots=True)
class PageTable:
    """The pages holding one sequence's K/V, in token order."""

    pages: list[int] = field(default_factory=list)
    _array: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32), repr=False)
    _num_synced: int = field(default=0, repr=False)

    def row(self) -> np.ndarray:
        """`pages` as int32, kept in step with the list as it grows (each page converted once;
        a step's block tables are built from these rows without a Python list per step)."""
        n = len(self.pages)
        if n < self._num_synced:  # the list was replaced: start over
            self._num_synced = 0
        if n > self._array.shape[0]:
            grown = np.empty(max(n, 2 * self._array.shape[0], 16), dtype=np.int32)
            grown[:self._num_synced] = self._array[:self._num_synced]
            self._array = grown
        if n > self._num_synced:
            self._array[self._num_synced:n] = self.pages[self._num_synced:n]
            self._num_synced = n
        return self._array[:n]

    def num_missing_pages(self, layout: KVLayout, num_tokens: int) -> int:
        """Pages still to allocate so that `num_tokens` tokens fit."""
        return max(0, layout.num_pages_for(num_tokens) - len(self.pages))

    def grow(self, pool: PagePool, layout: KVLayout, num_tokens: int) -> None:
        """Allocate pages so that `num_tokens` fit; raises OutOfPagesError, allocating nothing."""
        missing = self.num_missing_pages(layout, num_tokens)
        if missing:
            self.pages.extend(pool.allocate(missing, PageUse.KV))

    def release(self, pool: PagePool) -> None:
        pool.free(self.pages)
        self.pages = []
        self._num_synced = 0

    def slot_list(self, layout: KVLayout, start: int, end: int) -> list[int]:
        """Flat `page * page_size + offset` of tokens start..end: where their K/V are written
        (a list: the scheduler builds a step's tensors once, not per sequence)."""
        p, pages = layout.page_size, self.pages
        return [pages[i // p] * p + i % p for i in range(start, end)]

    def slots(self, layout: KVLayout, start: int, end: int) -> torch.Tensor:
        """`slot_list` as an [end - start] int64 tensor."""
        return torch.tensor(self.slot_list(layout, start, end), dtype=torch.int64)
