"""Host tier: registered adapters (disk) and a bounded LRU of parsed ones in host RAM.

Owns `AdapterRecord`, `HostCache` and its `Prefetcher` (a worker thread reading adapters ahead
of admission). Parsing is the model layer's (`model.adapters.peft`); this tier decides what stays
in RAM. The cache is thread-safe: the engine thread and the prefetch worker share it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loraplex.model.adapters.canonical import AdapterWeights, LoraModule

logger = logging.getLogger(__name__)
_uids = itertools.count(1)


@dataclass(eq=False, slots=True)
class AdapterRecord:
    """One registered version of an adapter. A hot-swap registers a new record under the name."""

    name: str
    path: str
    kind: str
    """`lora`, `dora` or `shira` (validated at registration)."""
    max_rank: int
    num_bytes: int
    """Bytes of the parsed weights (host RAM when cached)."""
    num_pages: int
    """Pool pages the adapter takes when resident."""
    target_modules: tuple[str, ...]
    version: int = 1
    uid: int = field(default_factory=lambda: next(_uids))
    """Unique over the process: residency and caches key on it, never on the name."""
    meta: dict = field(default_factory=dict)


def pin_weights(weights: AdapterWeights) -> AdapterWeights:
    """A copy of `weights` in page-locked host memory (fast, asynchronous host → device copies)."""

    def pin(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.pin_memory()

    modules = {}
    for key, m in weights.modules.items():
        if isinstance(m, LoraModule):
            modules[key] = dataclasses.replace(m, a=pin(m.a), b_t=pin(m.b_t),
                                               row_scale=pin(m.row_scale))
        else:
            modules[key] = dataclasses.replace(m, rows=pin(m.rows), cols=pin(m.cols),
                                               values=pin(m.values))
    return dataclasses.replace(weights, modules=modules)


class HostCache:
    """LRU of parsed adapters, never above `capacity_bytes`; a miss re-reads from disk.

    An adapter larger than the whole bound is handed out but not kept. Concurrent misses on one
    adapter read it once: the second caller waits for the first one's read.
    """

    def __init__(self, capacity_bytes: int, load: Callable[[AdapterRecord], AdapterWeights],
                 pin_memory: bool = False):
        self.capacity_bytes = capacity_bytes
        self.pin_memory = pin_memory
        """Keep tensors page-locked (CUDA pools): host → pool copies can then be asynchronous."""
        self._load = load
        self._entries: OrderedDict[int, AdapterWeights] = OrderedDict()
        self._loading: dict[int, threading.Event] = {}
        self._dropped: set[int] = set()
        self._prefetched: set[int] = set()
        """Entries the prefetch worker read that no `get` has used yet."""
        self._lock = threading.Lock()
        self.num_bytes = 0
        self.num_hits = 0
        self.num_misses = 0
        self.num_evictions = 0
        self.num_prefetches = 0
        """Adapters read from disk ahead of need (by `fetch`, the prefetch worker's call)."""
        self.num_blocking_reads = 0
        """Adapters read from disk by `get` itself: its caller (the engine thread) waited."""

    def put(self, record: AdapterRecord, weights: AdapterWeights) -> None:
        """Keep `weights` (most recently used), evicting LRU entries to stay in bounds."""
        weights = self._pinned(weights)
        with self._lock:
            self._put_locked(record, weights)

    def put_if_room(self, record: AdapterRecord, weights: AdapterWeights) -> bool:
        """Keep `weights` only if that evicts nothing (registration must not push out hot ones)."""
        with self._lock:
            if self.num_bytes + weights.num_bytes > self.capacity_bytes:
                return False
        weights = self._pinned(weights)  # outside the lock: a copy of the whole adapter
        with self._lock:
            if self.num_bytes + weights.num_bytes > self.capacity_bytes:
                return False
            self._put_locked(record, weights)
            return True

    def get(self, record: AdapterRecord) -> AdapterWeights:
        """The parsed adapter: from RAM, else read from disk (waiting for a read in flight)."""
        return self.get_with_source(record)[0]

    def get_with_source(self, record: AdapterRecord) -> tuple[AdapterWeights, str]:
        """`get`, and where this use found it: `disk` when read from disk for it (now, or ahead
        by the prefetch worker: a miss either way), else `host` (a hit)."""
        weights, read_here = self._get(record, prefetch=False)
        with self._lock:
            is_miss = read_here or record.uid in self._prefetched
            self._prefetched.discard(record.uid)
            if is_miss:
                self.num_misses += 1
            else:
                self.num_hits += 1
        return weights, "disk" if is_miss else "host"

    def fetch(self, record: AdapterRecord) -> None:
        """Bring `record` into RAM ahead of need (the prefetch worker's call); raises as `get`."""
        self._get(record, prefetch=True)

    def fits(self, record: AdapterRecord) -> bool:
        """Could `record` be kept at all (it is no larger than the bound)?"""
        return record.num_bytes <= self.capacity_bytes

    def drop(self, record: AdapterRecord) -> None:
        """Forget a deleted or replaced version (a read in flight for it is not kept either)."""
        with self._lock:
            self._dropped.add(record.uid)
            self._prefetched.discard(record.uid)
            weights = self._entries.pop(record.uid, None)
            if weights is not None:
                self.num_bytes -= weights.num_bytes

    def __contains__(self, record: AdapterRecord) -> bool:
        with self._lock:
            return record.uid in self._entries

    def is_loading(self, record: AdapterRecord) -> bool:
        with self._lock:
            return record.uid in self._loading

    @property
    def num_entries(self) -> int:
        return len(self._entries)

    # ---- internals -----------------------------------------------------------------------
    def _pinned(self, weights: AdapterWeights) -> AdapterWeights:
        """Page-locked when this tier keeps pinned memory (a pool's side-stream copy from
        pageable memory would make the host wait for it), else `weights` as they are."""
        if not self.pin_memory or not weights.modules:
            return weights
        module = next(iter(weights.modules.values()))
        first = module.a if isinstance(module, LoraModule) else module.values
        return weights if first.is_pinned() else pin_weights(weights)

    def _get(self, record: AdapterRecord, prefetch: bool) -> tuple[AdapterWeights | None, bool]:
        """(weights, whether this call read them from disk)."""
        while True:
            with self._lock:
                weights = self._entries.get(record.uid)
                if weights is not None:
                    self._entries.move_to_end(record.uid)
                    return weights, False
                pending = self._loading.get(record.uid)
                if pending is None:
                    done = self._loading[record.uid] = threading.Event()
                    if prefetch:
                        self.num_prefetches += 1
                    else:
                        self.num_blocking_reads += 1
                    break
            pending.wait()  # another thread reads it; take its result (or read it ourselves)
            if prefetch:
                return None, False
        try:
            weights = self._load(record)
            if self.pin_memory:
                weights = pin_weights(weights)
            with self._lock:
                self._put_locked(record, weights)
                if prefetch and record.uid in self._entries:
                    self._prefetched.add(record.uid)
            return weights, True
        finally:
            with self._lock:
                del self._loading[record.uid]
            done.set()

    def _put_locked(self, record: AdapterRecord, weights: AdapterWeights) -> None:
        if record.uid in self._entries:
            self._entries.move_to_end(record.uid)
            return
        if record.uid in self._dropped or weights.num_bytes > self.capacity_bytes:
            return
        # Evict before adding: `num_bytes` is read without the lock and never exceeds the bound.
        while self.num_bytes + weights.num_bytes > self.capacity_bytes:
            uid, old = self._entries.popitem(last=False)
            self._prefetched.discard(uid)
            self.num_bytes -= old.num_bytes
            self.num_evictions += 1
            logger.debug("host cache evicted adapter uid=%d (%d bytes)", uid, old.num_bytes)
        self._entries[record.uid] = weights
        self.num_bytes += weights.num_bytes


class Prefetcher:
    """A worker thread that reads the adapters waiting requests need into a `HostCache`.

    The engine thread states what it wants (`want`, most urgent first); the worker reads them
    one at a time. The thread starts on demand and ends after `idle_exit_s` without work, so an
    idle engine holds no thread (nor, through it, itself).
    """

    def __init__(self, cache: HostCache, idle_exit_s: float = 2.0):
        self.cache = cache
        self.idle_exit_s = idle_exit_s
        self._wanted: list[AdapterRecord] = []
        self._failed: set[int] = set()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()

    def want(self, records: list[AdapterRecord]) -> None:
        """Replace the wish list. Only the head that fits in half the cache's bound is read (so
        prefetched adapters do not push each other out), and always the first one that fits the
        cache at all; ones in RAM or failed are skipped."""
        budget, wanted = self.cache.capacity_bytes // 2, []
        for record in records:
            if not self.cache.fits(record):
                continue  # its request reads it when admitted
            if budget < record.num_bytes and budget < self.cache.capacity_bytes // 2:
                break
            budget -= record.num_bytes
            if record.uid not in self._failed and record not in self.cache:
                wanted.append(record)
        with self._cond:
            if self._closed:
                return
            self._wanted = wanted
            if wanted and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="loraplex-prefetch",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def has_failed(self, record: AdapterRecord) -> bool:
        """The worker could not read `record`: its request should load it (and meet the error)."""
        return record.uid in self._failed

    def is_pending(self, record: AdapterRecord) -> bool:
        """Wanted or being read right now."""
        with self._cond:
            return record in self._wanted or self.cache.is_loading(record)

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until the wish list is read (tests, and a drained shutdown); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._wanted and not self._busy, timeout_s)

    def close(self) -> None:
        """Stop after the current read; later `want` calls do nothing."""
        with self._cond:
            self._closed = True
            self._wanted = []
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._wanted and not self._closed:
                    if not self._cond.wait(self.idle_exit_s) and not self._wanted:
                        break
                if not self._wanted or self._closed:
                    self._thread = None
                    self._cond.notify_all()
                    return
                record = self._wanted.pop(0)
                self._busy = True
            try:
                self.cache.fetch(record)
            except Exception:  # the request meets the error itself, on the engine thread
                logger.warning("prefetch of adapter %s v%d failed", record.name, record.version,
                               exc_info=True)
                self._failed.add(record.uid)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
