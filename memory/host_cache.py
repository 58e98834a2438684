"""Host tier: registered adapters (disk) and a bounded LRU of parsed ones in host RAM.

Owns `AdapterRecord` (one registered version of an adapter) and `HostCache`. Parsing is the
model layer's (`model.adapters.peft`); this tier only decides what stays in RAM.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from loraplex.model.adapters.canonical import AdapterWeights

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


class HostCache:
    """LRU of parsed adapters bounded by bytes; a miss re-reads the adapter from disk."""

    def __init__(self, capacity_bytes: int, load: Callable[[AdapterRecord], AdapterWeights]):
        self.capacity_bytes = capacity_bytes
        self._load = load
        self._entries: OrderedDict[int, AdapterWeights] = OrderedDict()
        self._lock = threading.Lock()
        self.num_bytes = 0
        self.num_hits = 0
        self.num_misses = 0
        self.num_evictions = 0

    def put(self, record: AdapterRecord, weights: AdapterWeights) -> None:
        with self._lock:
            if record.uid in self._entries:
                self._entries.move_to_end(record.uid)
                return
            self._entries[record.uid] = weights
            self.num_bytes += weights.num_bytes
            self._shrink()

    def get(self, record: AdapterRecord) -> AdapterWeights:
        with self._lock:
            weights = self._entries.get(record.uid)
            if weights is not None:
                self._entries.move_to_end(record.uid)
                self.num_hits += 1
                return weights
            self.num_misses += 1
        weights = self._load(record)
        self.put(record, weights)
        return weights

    def drop(self, record: AdapterRecord) -> None:
        with self._lock:
            weights = self._entries.pop(record.uid, None)
            if weights is not None:
                self.num_bytes -= weights.num_bytes

    def __contains__(self, record: AdapterRecord) -> bool:
        return record.uid in self._entries

    def _shrink(self) -> None:
        # The newest entry always stays, even over capacity: it is about to be used.
        while self.num_bytes > self.capacity_bytes and len(self._entries) > 1:
            uid, weights = self._entries.popitem(last=False)
            self.num_bytes -= weights.num_bytes
            self.num_evictions += 1
            logger.debug("host cache evicted adapter uid=%d (%d bytes)", uid, weights.num_bytes)
