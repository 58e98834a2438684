"""Device prefetch: adapters that waiting requests need, copied from the host tier into spare pool
pages ahead of admission, so that the step admitting a request does no load for it.

Decides what to copy and how much room to leave; the copy itself (side CUDA stream) is
`memory.adapters.AdapterResidency.prefetch`'s. Knows sequences and page counts, never tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from loraplex.memory.adapters import AdapterResidency
from loraplex.memory.host_cache import AdapterRecord, HostCache
from loraplex.memory.kv import KVLayout
from loraplex.model.adapters.canonical import AdapterWeights
from loraplex.scheduler.request import Sequence

logger = logging.getLogger(__name__)


def needed_adapters(seqs: Iterable[Sequence]) -> set[int]:
    """Uids of the adapters these sequences run on: a prefetch never evicts one of them."""
    return {s.request.adapter.uid for s in seqs if s.request.adapter is not None}


def prefetch_to_pool(order: Iterable[Sequence], running: Iterable[Sequence], *,
                     residency: AdapterResidency, host_cache: HostCache,
                     load: Callable[[AdapterRecord], AdapterWeights], layout: KVLayout,
                     keep: set[int], max_loads: int | None) -> int:
    """Make resident, unpinned, the adapters of waiting sequences (`order`: most urgent first)
    that are in the host tier; returns how many were copied.

    Each copy leaves free the K/V pages that the running sequences miss for their next page of
    tokens and that every waiting sequence up to and including its own needs for its tokens:
    what admission will ask for first (KV growth that still finds no free page evicts
    prefetched adapters like any idle one: never a preemption). At most `max_loads` copies,
    among the first `residency.num_slots` distinct adapters of `order`. Adapters still on disk
    are skipped (the host tier's worker reads them: a prefetch never waits on a disk read).
    Stops at the first one that does not fit, so that a later, smaller one never takes the
    room that a more urgent one needs.
    """
    reserve = sum(s.page_table.num_missing_pages(layout, s.num_tokens + layout.page_size)
                  for s in running)
    num_loaded, seen = 0, set()
    for seq in order:
        reserve += seq.page_table.num_missing_pages(layout, seq.num_tokens)
        record = seq.request.adapter
        if record is None or record.uid in seen:
            continue
        if len(seen) >= residency.num_slots or (max_loads is not None and num_loaded >= max_loads):
            break
        seen.add(record.uid)
        if residency.is_resident(record) or record not in host_cache:
            continue
        try:
            loaded = residency.prefetch(record, lambda r=record: load(r), keep=keep,
                                        reserve_pages=reserve)
        except Exception:  # nothing changed: its request meets the error when admitted
            logger.warning("device prefetch of adapter %s v%d failed", record.name,
                           record.version, exc_info=True)
            break
        if not loaded:
            break
        num_loaded += 1
    return num_loaded
