"""MemoryConfig: sizes of the unified page pool and of the adapter tiers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    """How much memory the pool and the host tier may use, and how it is cut."""

    page_size: int = 16
    """Tokens per KV page; a page holds K and V of every layer for that many tokens."""
    num_pages: int | None = None
    """Pages in the pool; None derives it from `pool_bytes`."""
    pool_bytes: int = 512 * 2**20
    """Bytes of the one pool tensor (KV and resident adapters together) when `num_pages` is None."""
    max_rank: int = 64
    """Largest LoRA rank accepted; row tables are this wide."""
    max_resident_adapters: int = 64
    """Adapter slots on the device at once (row-table height); idle ones are evicted LRU."""
    host_cache_bytes: int = 2 * 2**30
    """Bound of the host-RAM LRU tier of parsed adapters (never exceeded)."""
    prefetch: bool = True
    """Read adapters that waiting requests need from disk into the host tier on a worker
    thread, ahead of admission; False reads them on the engine thread when admitted."""
    device_prefetch: bool = True
    """Copy adapters that waiting requests need from the host tier into spare pool pages ahead
    of admission (on a side CUDA stream, overlapping the step's compute); they stay idle and
    evictable until used. False loads them into the pool only when their request is admitted."""

    def __post_init__(self) -> None:
        for name in ("page_size", "max_rank", "max_resident_adapters", "pool_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"num_pages: must be >= 1, got {self.num_pages}")
        if self.host_cache_bytes < 0:
            raise ValueError(f"host_cache_bytes: must be >= 0, got {self.host_cache_bytes}")
