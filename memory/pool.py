"""PagePool: the one device tensor of fixed-size pages shared by KV and adapter weights.

Owns the free list and who uses each page; knows nothing of what the pages hold.
"""

from __future__ import annotations

from enum import IntEnum

import torch


class PageUse(IntEnum):
    FREE = 0
    KV = 1
    ADAPTER = 2


class OutOfPagesError(RuntimeError):
    """An allocation asked for more pages than are free (callers evict or preempt first)."""


class PagePool:
    """`tensor: [num_pages, page_numel]`; pages are handed out by index, any order."""

    def __init__(self, num_pages: int, page_numel: int, dtype: torch.dtype, device: torch.device):
        if page_numel % 2:
            raise ValueError(f"page_numel: must be even (int32 views), got {page_numel}")
        self.tensor = torch.zeros(num_pages, page_numel, dtype=dtype, device=device)
        self.page_numel = page_numel
        self._use = [PageUse.FREE] * num_pages
        # Pop from the end: low page ids are handed out first, which keeps tests readable.
        self._free = list(range(num_pages - 1, -1, -1))
        self._num_used = {PageUse.KV: 0, PageUse.ADAPTER: 0}

    @property
    def num_pages(self) -> int:
        return len(self._use)

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_kv_pages(self) -> int:
        return self._num_used[PageUse.KV]

    @property
    def num_adapter_pages(self) -> int:
        return self._num_used[PageUse.ADAPTER]

    @property
    def page_bytes(self) -> int:
        return self.page_numel * self.tensor.element_size()

    def allocate(self, num_pages: int, use: PageUse) -> list[int]:
        if num_pages > len(self._free):
            raise OutOfPagesError(f"asked for {num_pages} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(num_pages)]
        for p in pages:
            self._use[p] = use
        self._num_used[use] += num_pages
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            use = self._use[p]
            assert use != PageUse.FREE, f"page {p} freed twice"
            self._use[p] = PageUse.FREE
            self._num_used[use] -= 1
            self._free.append(p)

    def usage(self) -> dict[str, int]:
        """Pages used by KV, by adapters, and free: what metrics and admission read."""
        return {
            "kv": self.num_kv_pages,
            "adapter": self.num_adapter_pages,
            "free": self.num_free_pages,
        }
