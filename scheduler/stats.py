"""A snapshot of the engine for metrics and admin routes (filled by `Engine.stats`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AdapterLoad:
    """One adapter brought into the pool: from where and how long that took."""

    adapter: str
    source: str
    """`disk` (read and parsed: a host-cache miss) or `host` (already parsed in RAM)."""
    seconds: float


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Counts are cumulative since start; gauges are as of the snapshot."""

    num_running: int
    num_waiting: int
    num_pages: int
    num_kv_pages: int
    num_adapter_pages: int
    num_free_pages: int
    running_per_adapter: dict[str, int]
    """Adapter name → running sequences on it (the base model is not an adapter)."""
    waiting_adapters: tuple[str, ...]
    """Names of adapters that waiting requests need, each once."""
    max_resident_adapters: int
    num_resident_adapters: int
    num_registered_adapters: int
    num_preemptions: int
    host_cache_hits: int
    host_cache_misses: int
    host_cache_evictions: int
    host_cache_bytes: int
    device_adapter_loads: int
    device_adapter_evictions: int
    adapter_loads: tuple[AdapterLoad, ...]
    """Loads since the previous snapshot (each reported once)."""

    @property
    def kv_usage(self) -> float:
        """Fraction of the pool holding K/V (what `vllm:gpu_cache_usage_perc` reports)."""
        return self.num_kv_pages / self.num_pages if self.num_pages else 0.0
