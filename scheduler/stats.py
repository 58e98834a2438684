"""A snapshot of the engine for metrics and admin routes (filled by `Engine.stats`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraplex.memory.adapters import AdapterResidency
    from loraplex.memory.host_cache import HostCache
    from loraplex.memory.pool import PagePool
    from loraplex.scheduler.scheduler import Scheduler


ADAPTER_LOAD_LOG = 1024
"""Recent adapter loads an engine keeps for its snapshots (metrics read after every step)."""


@dataclass(frozen=True, slots=True)
class AdapterLoad:
    """One adapter brought into the pool: from where and how long that took."""

    adapter: str
    source: str
    """`disk` (read and parsed for this load: on the engine thread, or ahead of it by the
    prefetch worker) or `host` (already parsed in RAM from an earlier use)."""
    seconds: float
    """Time the engine thread spent (a prefetched read cost the step nothing)."""
    number: int = 0
    """Its place among the engine's loads, from 1 (a reader folds in those past the last it saw)."""


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
    """The most recent loads, oldest first (`ADAPTER_LOAD_LOG` at most), numbered: a reader
    folds in those numbered past the last it saw (snapshots have no side effects)."""
    num_early_aborts: int = 0
    """Waiting requests aborted because they could no longer meet their deadline (cumulative)."""
    host_cache_capacity_bytes: int = 0
    """The host tier's bound (`host_cache_bytes` never exceeds it)."""
    host_prefetches: int = 0
    """Adapters the prefetch worker read from disk ahead of admission (cumulative)."""
    num_host_cached_adapters: int = 0
    """Parsed adapters held in host RAM now."""
    host_blocking_reads: int = 0
    """Adapters read from disk on the engine thread, a step waiting (cumulative; prefetch keeps
    this near zero). `host_cache_misses` counts every read from disk for a load, these too."""
    device_prefetches: int = 0
    """Adapters copied from the host tier into the pool ahead of admission (cumulative; also
    counted in `device_adapter_loads`, of which the rest were loaded at admission)."""
    device_prefetch_hits: int = 0
    """Admissions that found their adapter resident thanks to a prefetch (cumulative)."""
    device_prefetches_unused: int = 0
    """Prefetched adapters evicted before any request used them (cumulative; wasted copies)."""
    num_adapter_loads: int = 0
    """Loads so far (the number of the latest)."""
    resident_adapter_admissions: int = 0
    """Admissions that found their adapter already resident, prefetched or left from an earlier
    use: no load in their step (cumulative)."""

    @property
    def kv_usage(self) -> float:
        """Fraction of the pool holding K/V (what `vllm:gpu_cache_usage_perc` reports)."""
        return self.num_kv_pages / self.num_pages if self.num_pages else 0.0


def snapshot(scheduler: Scheduler, pool: PagePool, host_cache: HostCache,
             residency: AdapterResidency, num_registered_adapters: int,
             adapter_loads: tuple[AdapterLoad, ...]) -> EngineStats:
    """Gauges and counters of the engine's parts, as of now."""
    running: dict[str, int] = {}
    for seq in scheduler.running:
        if seq.request.adapter is not None:
            name = seq.request.adapter.name
            running[name] = running.get(name, 0) + 1
    waiting = {s.request.adapter.name for s in scheduler.waiting if s.request.adapter}
    hc, res = host_cache, residency
    return EngineStats(
        num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
        num_pages=pool.num_pages, num_kv_pages=pool.num_kv_pages,
        num_adapter_pages=pool.num_adapter_pages, num_free_pages=pool.num_free_pages,
        running_per_adapter=running, waiting_adapters=tuple(sorted(waiting)),
        max_resident_adapters=res.num_slots, num_resident_adapters=res.num_resident,
        num_registered_adapters=num_registered_adapters,
        num_preemptions=scheduler.num_preemptions,
        host_cache_hits=hc.num_hits, host_cache_misses=hc.num_misses,
        host_cache_evictions=hc.num_evictions, host_cache_bytes=hc.num_bytes,
        device_adapter_loads=res.num_loads, device_adapter_evictions=res.num_evictions,
        adapter_loads=adapter_loads, num_early_aborts=scheduler.num_early_aborts,
        num_adapter_loads=adapter_loads[-1].number if adapter_loads else 0,
        host_cache_capacity_bytes=hc.capacity_bytes, host_prefetches=hc.num_prefetches,
        num_host_cached_adapters=hc.num_entries, host_blocking_reads=hc.num_blocking_reads,
        device_prefetches=res.num_prefetches, device_prefetch_hits=res.num_prefetch_hits,
        device_prefetches_unused=res.num_prefetches_unused,
        resident_adapter_admissions=res.num_resident_acquires)
