"""Adapter residency in the pool: pin, unpin, LRU eviction, row tables, loading into pages.

An adapter's rows (A: r × d_in, Bᵀ: r × d_out, DoRA g: 1 × d_out, SHiRA values and positions in
rows of d_in + d_out) are packed into whole pages; kernels read them in place via `AdapterTables`.
Prefetch loads an adapter unpinned ahead of need; on CUDA on a side stream (see `prefetch`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loraplex.memory.host_cache import AdapterRecord
from loraplex.memory.pool import OutOfPagesError, PagePool, PageUse
from loraplex.memory.tables import AdapterTables, Packer
from loraplex.model.adapters.canonical import AdapterWeights, LoraModule, ShiraModule
from loraplex.model.config import TARGET_MODULES, ModelConfig

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Placement:
    """Where each module's rows go, in local offsets (mapped to pages at load)."""

    num_pages: int
    modules: list[tuple[int, int, object, torch.Tensor, torch.Tensor, torch.Tensor | None]]
    """(layer, module index, module weights, first rows, second rows, g row or None)."""


@dataclass(slots=True)
class _Resident:
    slot: int
    pages: list[int]
    num_pins: int = 0
    last_used: int = 0
    is_dropped: bool = False
    is_prefetched: bool = False
    """Loaded by `prefetch` and not acquired since."""
    ready: object | None = None
    """CUDA: the event recorded on the side stream after a prefetch's copies and row-table
    writes; the compute stream waits on it before anything touches the slot or pages."""


@dataclass(slots=True)
class AdapterResidency:
    """Which adapters are in the pool, in which slot and pages; evicts idle ones LRU."""

    pool: PagePool
    config: ModelConfig
    max_rank: int
    num_slots: int
    tables: AdapterTables = field(init=False)
    num_loads: int = 0
    """Adapters copied into the pool, prefetches included."""
    num_evictions: int = 0
    num_prefetches: int = 0
    """Loads by `prefetch`, ahead of admission (`num_loads` minus these: loads at admission)."""
    num_prefetch_hits: int = 0
    """Acquires that found an adapter a prefetch had loaded (a load the admission was spared)."""
    num_prefetches_unused: int = 0
    """Prefetched adapters evicted before any acquire (wasted copies)."""
    num_resident_acquires: int = 0
    """Acquires that found the adapter resident, for any reason (no load at admission)."""
    _resident: dict[int, _Resident] = field(default_factory=dict)
    _free_slots: list[int] = field(default_factory=list)
    _clock: int = 0
    _side_stream: object | None = None

    def __post_init__(self) -> None:
        device = self.pool.tensor.device
        self.tables = AdapterTables.empty(
            self.config.num_layers, self.num_slots, self.max_rank, device
        )
        self._free_slots = list(range(self.num_slots - 1, -1, -1))

    # ---- queries -------------------------------------------------------------------------
    def is_resident(self, record: AdapterRecord) -> bool:
        return record.uid in self._resident

    def slot_of(self, record: AdapterRecord) -> int:
        return self._resident[record.uid].slot

    @property
    def num_resident(self) -> int:
        return len(self._resident)

    def num_evictable_pages(self) -> int:
        return sum(len(r.pages) for r in self._resident.values() if r.num_pins == 0)

    def can_acquire(self, record: AdapterRecord, extra_pages: int = 0) -> bool:
        """Could `acquire` succeed (evicting idle adapters) with `extra_pages` left free after?"""
        if record.uid in self._resident:
            return self.pool.num_free_pages + self.num_evictable_pages() >= extra_pages
        has_slot = self._free_slots or any(r.num_pins == 0 for r in self._resident.values())
        free = self.pool.num_free_pages + self.num_evictable_pages()
        return bool(has_slot) and free >= record.num_pages + extra_pages

    def num_pages_for(self, weights: AdapterWeights) -> int:
        return self._place(weights).num_pages

    # ---- pin / unpin ---------------------------------------------------------------------
    def acquire(self, record: AdapterRecord, weights: Callable[[], AdapterWeights]) -> int:
        """Pin `record` in the pool (loading it if needed) and return its slot.

        Raises OutOfPagesError, having changed nothing but evicting idle adapters, when even
        that cannot make room.
        """
        self._clock += 1
        entry = self._resident.get(record.uid)
        if entry is None:
            entry = self._load(record, weights())
        else:
            self.num_resident_acquires += 1
            self.num_prefetch_hits += entry.is_prefetched
            entry.is_prefetched = False
            self._wait_ready(entry)  # the forward that reads it comes after
        entry.num_pins += 1
        entry.last_used = self._clock
        return entry.slot

    def release(self, record: AdapterRecord) -> None:
        entry = self._resident[record.uid]
        assert entry.num_pins > 0, f"adapter {record.name} released more than acquired"
        entry.num_pins -= 1
        if entry.num_pins == 0 and entry.is_dropped:
            self._evict(record.uid)

    def drop(self, record: AdapterRecord) -> None:
        """Forget a deleted or replaced version: evict now if idle, else at its last release."""
        entry = self._resident.get(record.uid)
        if entry is None:
            return
        if entry.num_pins == 0:
            self._evict(record.uid)
        else:
            entry.is_dropped = True

    def evict_idle(self, num_pages: int) -> int:
        """Evict idle adapters, least recently used first, until `num_pages` are free."""
        freed = 0
        while self.pool.num_free_pages < num_pages:
            idle = [(r.last_used, uid) for uid, r in self._resident.items() if r.num_pins == 0]
            if not idle:
                break
            freed += self._evict(min(idle)[1])
        return freed

    # ---- prefetch ------------------------------------------------------------------------
    def prefetch(self, record: AdapterRecord, weights: Callable[[], AdapterWeights], *,
                 keep: set[int], reserve_pages: int) -> bool:
        """Load `record` unpinned, ahead of its request's admission: an idle resident, evicted
        LRU like any other. Makes room only from free pages and idle adapters whose uid is not
        in `keep` (never a pinned one), leaving `reserve_pages` free. False, having changed
        nothing, when that is not enough (or it is resident already).

        On CUDA the page and row-table writes go on a side stream, ordered after all work
        already queued on the compute stream (which may still read pages or write the slot
        just freed) and followed by an event; `acquire` and eviction make the compute stream
        wait on that event before anything reads or reuses the slot or its pages.
        """
        if record.uid in self._resident:
            return False
        victims = self._prefetch_victims(record.num_pages + reserve_pages, keep)
        if victims is None:
            return False
        w = weights()
        placement = self._place(w)
        assert placement.num_pages == record.num_pages, f"adapter {record.name}: stale num_pages"
        for uid in victims:
            self._evict(uid)
        device = self.pool.tensor.device
        if device.type == "cuda":
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(device)
            side = self._side_stream
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                entry = self._load(record, w, placement)
                entry.ready = torch.cuda.Event()
                entry.ready.record(side)
        else:
            entry = self._load(record, w, placement)
        self._clock += 1
        entry.last_used = self._clock  # about to be used: evicted after older idle ones
        entry.is_prefetched = True
        self.num_prefetches += 1
        return True

    def _prefetch_victims(self, num_pages: int, keep: set[int]) -> list[int] | None:
        """Idle adapters outside `keep`, LRU first, whose eviction gives a slot and `num_pages`
        free pages (None: not enough)."""
        free, has_slot, victims = self.pool.num_free_pages, bool(self._free_slots), []
        idle = sorted((r.last_used, uid) for uid, r in self._resident.items()
                      if r.num_pins == 0 and uid not in keep)
        for _, uid in idle:
            if has_slot and free >= num_pages:
                break
            victims.append(uid)
            free, has_slot = free + len(self._resident[uid].pages), True
        return victims if has_slot and free >= num_pages else None

    def _wait_ready(self, entry: _Resident) -> None:
        """Order the compute stream after a prefetch's side-stream writes (a GPU-side wait)."""
        if entry.ready is not None:
            torch.cuda.current_stream(self.pool.tensor.device).wait_event(entry.ready)
            entry.ready = None

    # ---- internals -----------------------------------------------------------------------
    def _evict(self, uid: int) -> int:
        entry = self._resident.pop(uid)
        self._wait_ready(entry)  # its copy may still be writing the slot and pages freed here
        self.num_prefetches_unused += entry.is_prefetched
        t = self.tables
        t.ranks[:, :, entry.slot] = 0
        t.g_rows[:, :, entry.slot] = -1
        self.pool.free(entry.pages)
        self._free_slots.append(entry.slot)
        self.num_evictions += 1
        return len(entry.pages)

    def _make_room(self, num_pages: int) -> None:
        if not self._free_slots:
            self._evict_one_idle()
        self.evict_idle(num_pages)
        if self.pool.num_free_pages < num_pages:
            raise OutOfPagesError(
                f"adapter needs {num_pages} pages; {self.pool.num_free_pages} free after evicting"
            )

    def _evict_one_idle(self) -> None:
        idle = [(r.last_used, uid) for uid, r in self._resident.items() if r.num_pins == 0]
        if not idle:
            raise OutOfPagesError(f"all {self.num_slots} adapter slots are pinned")
        self._evict(min(idle)[1])

    def _load(self, record: AdapterRecord, weights: AdapterWeights,
              placement: _Placement | None = None) -> _Resident:
        placement = placement or self._place(weights)
        self._make_room(placement.num_pages)
        pages = self.pool.allocate(placement.num_pages, PageUse.ADAPTER)
        slot = self._free_slots.pop()
        page_ids = torch.tensor(pages, dtype=torch.int64)
        numel = self.pool.page_numel

        def to_global(local: torch.Tensor) -> torch.Tensor:
            return page_ids[local // numel] * numel + local % numel

        num_layers, num_modules = self.config.num_layers, len(TARGET_MODULES)
        a_rows = torch.zeros(num_layers, num_modules, self.max_rank, dtype=torch.int64)
        b_rows = torch.zeros_like(a_rows)
        ranks = torch.zeros(num_layers, num_modules, dtype=torch.int64)
        scales = torch.zeros(num_layers, num_modules, dtype=torch.float32)
        g_rows = torch.full((num_layers, num_modules), -1, dtype=torch.int64)
        for layer, m, module, first, second, g in placement.modules:
            first, second = to_global(first), to_global(second)
            g = None if g is None else to_global(g)
            d_out, d_in = self.config.module_shape(TARGET_MODULES[m])
            self._write_module(module, first, second, g, d_in, d_out)
            n = first.numel()
            if isinstance(module, ShiraModule):
                b_rows[layer, m, :n] = second * self.pool.tensor.element_size() // 4
                ranks[layer, m] = module.nnz
            else:
                b_rows[layer, m, :n] = second
                ranks[layer, m] = module.rank
                if g is not None:
                    g_rows[layer, m] = g[0]
            a_rows[layer, m, :n] = first
            scales[layer, m] = module.scale
        t, dev = self.tables, self._to_device
        t.a_rows[:, :, slot] = dev(a_rows)
        t.b_rows[:, :, slot] = dev(b_rows)
        t.ranks[:, :, slot] = dev(ranks)
        t.scales[:, :, slot] = dev(scales)
        t.g_rows[:, :, slot] = dev(g_rows)
        entry = _Resident(slot=slot, pages=pages)
        self._resident[record.uid] = entry
        self.num_loads += 1
        logger.debug("adapter %s v%d loaded: slot %d, %d pages", record.name, record.version,
                     slot, len(pages))
        return entry

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """`t` on the pool's device without the host waiting for the stream. Host-cache weights
        are page-locked on CUDA (an asynchronous DMA; the caching host allocator keeps them
        until it is done); small metadata is pageable, which CUDA stages at once (safe to free
        on return). Never `pin_memory()` here: a page-locked allocation synchronizes the device,
        which would make the host wait for a side-stream copy in flight."""
        device = self.pool.tensor.device
        return t.to(device, non_blocking=device.type == "cuda")

    def _place(self, weights: AdapterWeights) -> _Placement:
        elsize = self.pool.tensor.element_size()
        packer = Packer(self.pool.page_numel, align=max(1, 4 // elsize))
        modules = []
        order = sorted(weights.modules.items(),
                       key=lambda kv: (kv[0][0], TARGET_MODULES.index(kv[0][1])))
        for (layer, name), module in order:
            d_out, d_in = self.config.module_shape(name)
            m = TARGET_MODULES.index(name)
            if isinstance(module, LoraModule):
                first = packer.place(module.rank, d_in)
                second = packer.place(module.rank, d_out)
                g = None if module.row_scale is None else packer.place(1, d_out)
            else:
                width = d_in + d_out
                num_rows = -(-module.nnz // width)
                first = packer.place(num_rows, width)
                second = packer.place(num_rows, width * 4 // elsize)
                g = None
            modules.append((layer, m, module, first, second, g))
        return _Placement(num_pages=packer.num_pages, modules=modules)

    def _write_module(self, module: object, first: torch.Tensor, second: torch.Tensor,
                      g: torch.Tensor | None, d_in: int, d_out: int) -> None:
        flat = self.pool.tensor.view(-1)

        def put(dst_rows: torch.Tensor, rows: torch.Tensor, target: torch.Tensor) -> None:
            """rows[i] → target[dst_rows[i] : + width]: one copy per run of adjacent rows (the
            packer lays a module's rows end to end within a page)."""
            width = rows.shape[1]
            starts = dst_rows.tolist()
            i = 0
            while i < len(starts):
                j = i + 1
                while j < len(starts) and starts[j] == starts[j - 1] + width:
                    j += 1
                dst = target[starts[i]: starts[i] + (j - i) * width].view(j - i, width)
                # From page-locked host memory (or the device) this is an asynchronous copy;
                # a dtype change happens on the device.
                dst.copy_(rows[i:j], non_blocking=True)
                i = j

        if isinstance(module, LoraModule):
            put(first, module.a, flat)
            put(second, module.b_t, flat)
            if g is not None:
                put(g, module.row_scale.view(1, -1), flat)
            return
        assert isinstance(module, ShiraModule), f"unknown adapter module {type(module)}"
        # Padded to whole rows on the device: only the (page-locked) non-zeros cross the bus.
        width, num_rows, dev = d_in + d_out, first.numel(), flat.device
        values = torch.zeros(num_rows * width, dtype=torch.float32, device=dev)
        values[: module.nnz] = self._to_device(module.values).float()
        put(first, values.view(num_rows, width), flat)
        positions = torch.zeros(num_rows * width, dtype=torch.int32, device=dev)
        positions[: module.nnz] = (self._to_device(module.rows).long() * d_in
                                   + self._to_device(module.cols).long()).int()
        put(second * flat.element_size() // 4, positions.view(num_rows, width),
            flat.view(torch.int32))
