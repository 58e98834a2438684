"""Scheduler: iteration-level continuous batching over the unified page pool.

Each step: every running sequence gets its next token (or prefill chunk) first, oldest first;
then waiting sequences are admitted in `policy.admission_order` (fair between tenants, resident
adapters first) while the token budget, the sequence cap, the adapter-load cap and the pool
allow. When pages run out, idle adapters are evicted, then the newest running sequence is
preempted (its K/V freed, recomputed later). Last, adapters of requests still waiting are copied
into spare pages (`prefetch`). Knows pages and token ids, never tensors' contents.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from itertools import chain

from loraplex.memory.adapters import AdapterResidency
from loraplex.memory.host_cache import AdapterRecord, HostCache, Prefetcher
from loraplex.memory.kv import KVLayout
from loraplex.memory.pool import OutOfPagesError, PagePool
from loraplex.model.adapters.canonical import AdapterWeights
from loraplex.scheduler.batch import Batch, StepOutput, build_batch
from loraplex.scheduler.config import SchedulerConfig
from loraplex.scheduler.errors import DeadlineExceededError
from loraplex.scheduler.policy import (
    TIER_DISK,
    TIER_HOST,
    TIER_RESIDENT,
    TenantCounters,
    admission_order,
    is_aged,
)
from loraplex.scheduler.prefetch import needed_adapters, prefetch_to_pool
from loraplex.scheduler.request import RequestStatus, Sequence

logger = logging.getLogger(__name__)


def _adapter_key(seq: Sequence) -> int:
    return -1 if seq.request.adapter is None else seq.request.adapter.uid


class Scheduler:
    """Owns the waiting queue and the running set; builds one `Batch` per step."""

    def __init__(self, config: SchedulerConfig, pool: PagePool, kv_layout: KVLayout,
                 residency: AdapterResidency,
                 load_adapter: Callable[[AdapterRecord], AdapterWeights],
                 eos_token_ids: tuple[int, ...], max_model_len: int, *,
                 host_cache: HostCache | None = None, prefetcher: Prefetcher | None = None,
                 device_prefetch: bool = True):
        self.config = config
        self.host_cache = host_cache
        self.prefetcher = prefetcher
        """Reads adapters of waiting requests ahead (None: admission reads them itself)."""
        self.device_prefetch = device_prefetch
        """Copy adapters of waiting requests from the host tier into the pool ahead of
        admission (`MemoryConfig.device_prefetch`; needs `host_cache`)."""
        self.tenants = TenantCounters()
        self._num_unfinished: dict[str, int] = {}
        """Tenant → its queued and running sequences (who is active, for the fairness lift)."""
        self.num_steps = 0
        self.num_early_aborts = 0
        self._step_periods: deque[float] = deque(maxlen=16)
        self._last_step_start: float | None = None
        self._ran_batch = False
        self._num_deadlines = 0
        """Unfinished sequences with a deadline (none: no queue scan)."""
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.pool = pool
        self.kv_layout = kv_layout
        self.residency = residency
        self._load_adapter = load_adapter
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.failed: list[Sequence] = []
        """Sequences that failed at admission since the engine last collected them."""

    # ---- queue ---------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        tenant = seq.request.tenant
        if not self._num_unfinished.get(tenant):
            self.tenants.activate(tenant, [t for t, n in self._num_unfinished.items() if n])
        self._num_unfinished[tenant] = self._num_unfinished.get(tenant, 0) + 1
        self._num_deadlines += seq.request.deadline is not None
        seq.arrival_step = self.num_steps
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, status: RequestStatus, reason: str) -> None:
        """Take `seq` out of the queues and give back its pages and adapter pin."""
        if seq.status == RequestStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == RequestStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        if not seq.status.is_finished:
            self._forget(seq)
        seq.status, seq.finish_reason = status, reason

    def _forget(self, seq: Sequence) -> None:
        """Bookkeeping of a sequence that ends (finished, aborted or failed)."""
        self._num_unfinished[seq.request.tenant] -= 1
        self._num_deadlines -= seq.request.deadline is not None

    def expire_deadlines(self, now: float) -> list[Sequence]:
        """Call at the start of each step. Aborts waiting requests that can no longer get their
        first token by their deadline: even admitted now, their prefill takes `ceil(prompt /
        token budget)` steps, each at least as long as the fastest of the last 16 step periods
        (measured between steps that ran back to back). Running ones are never aborted."""
        if self._last_step_start is not None and self._ran_batch:
            self._step_periods.append(now - self._last_step_start)
        self._last_step_start = now
        step_s = min(self._step_periods, default=0.0)
        expired = []
        if not self._num_deadlines:
            return expired
        for seq in list(self.waiting):
            deadline = seq.request.deadline
            if deadline is None or seq.output_ids:  # a preempted one already had its first token
                continue
            num_steps = -(-seq.num_uncomputed_tokens // self.config.max_num_batched_tokens)
            if now + num_steps * step_s > deadline:
                seq.error = DeadlineExceededError(
                    f"request {seq.request.request_id} can no longer get its first token "
                    f"within its deadline ({deadline - seq.request.arrival_s:.3g} s after "
                    "arrival): aborted before it started")
                self.finish(seq, RequestStatus.ABORTED, "deadline")
                expired.append(seq)
        self.num_early_aborts += len(expired)
        return expired

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> Batch | None:
        """Pick this step's work and reserve its pages; None when there is nothing to run."""
        self.num_steps += 1
        budget = self.config.max_num_batched_tokens
        scheduled, budget, preempted = self._schedule_running(budget)
        for seq, n in scheduled:
            self.tenants.charge(seq.request.tenant, n)
        self._prefetch_ahead()
        if not preempted:  # under pressure, neither admissions nor device prefetches
            num_loads = self.residency.num_loads
            scheduled += self._admit_waiting(budget)  # charges as it admits: the order follows
            self._prefetch_to_pool(self.residency.num_loads - num_loads)
        self._ran_batch = bool(scheduled)
        if not scheduled:
            return None
        return build_batch(scheduled, self.kv_layout, self.residency.tables, self.pool.tensor)

    def update(self, batch: Batch, output: StepOutput) -> list[Sequence]:
        """Advance computed counts and append sampled tokens; returns the sampling sequences."""
        by_id = {s.seq_id: s for s in self.running}
        starts = batch.query_start_loc.tolist()
        for b, seq_id in enumerate(batch.seq_ids):
            by_id[seq_id].num_computed_tokens += starts[b + 1] - starts[b]
        sampled = []
        for i, seq_id in enumerate(batch.sample_seq_ids):
            seq = by_id[seq_id]
            seq.output_ids.append(output.token_ids[i])
            if output.logprobs is not None and seq.request.params.logprobs is not None:
                k = seq.request.params.logprobs
                top = output.top_logprobs[i][:k] if output.top_logprobs else []
                seq.logprobs.append({"id": output.token_ids[i], "logprob": output.logprobs[i],
                                    "top": top})
            sampled.append(seq)
            self._check_length_and_eos(seq)
        return sampled

    # ---- internals -----------------------------------------------------------------------
    def _check_length_and_eos(self, seq: Sequence) -> None:
        params, token = seq.request.params, seq.output_ids[-1]
        is_eos = not params.ignore_eos and token in self.eos_token_ids
        if token in params.stop_token_ids or is_eos:
            self.finish(seq, RequestStatus.FINISHED, "stop")
        elif len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            self.finish(seq, RequestStatus.FINISHED, "length")

    def _schedule_running(self, budget: int) -> tuple[list[tuple[Sequence, int]], int, bool]:
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        idx = 0
        while idx < len(self.running) and budget > 0:
            seq = self.running[idx]
            n = min(seq.num_uncomputed_tokens, budget)
            while not self._grow(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]  # the newest
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                scheduled.append((seq, n))
                budget -= n
                idx += 1
        return scheduled, budget, preempted

    def _order(self, dry_run: bool = False) -> Iterator[Sequence]:
        return admission_order(
            self.waiting, step=self.num_steps, max_wait_steps=self.config.max_wait_steps,
            tier=self._tier, counters=self.tenants if self.config.fairness else None,
            dry_run=dry_run)

    def _tier(self, seq: Sequence) -> int:
        record = seq.request.adapter
        if record is None or self.residency.is_resident(record):
            return TIER_RESIDENT
        if self.host_cache is not None and record in self.host_cache:
            return TIER_HOST
        return TIER_DISK

    def _prefetch_ahead(self) -> None:
        """Tell the prefetch worker which adapters the next admissions need, most urgent first
        (it reads as many as fit half the host tier)."""
        if self.prefetcher is None or not self.waiting:
            return
        records, seen, num_bytes = [], set(), 0
        for seq in self._order(dry_run=True):
            record = seq.request.adapter
            if record is None or record.uid in seen or self.residency.is_resident(record):
                continue
            seen.add(record.uid)
            records.append(record)
            num_bytes += record.num_bytes
            if num_bytes >= self.prefetcher.cache.capacity_bytes // 2:
                break  # `want` reads no further
        self.prefetcher.want(records)

    def _prefetch_to_pool(self, num_loads_done: int) -> None:
        """Copy adapters the next admissions need into spare pages (after this step's own
        allocations; overlapping its forward on CUDA); with this step's admission loads, at most
        `max_adapter_loads_per_step` loads."""
        cap = self.config.max_adapter_loads_per_step
        if not self.device_prefetch or self.host_cache is None or not self.waiting \
                or (cap is not None and num_loads_done >= cap):
            return
        prefetch_to_pool(
            self._order(dry_run=True), self.running, residency=self.residency,
            host_cache=self.host_cache, load=self._load_adapter, layout=self.kv_layout,
            keep=needed_adapters(chain(self.waiting, self.running)),
            max_loads=None if cap is None else cap - num_loads_done)

    def _must_wait_for_disk(self, record: AdapterRecord) -> bool:
        """Leave a request whose adapter is still on disk to the prefetch worker, while other
        work runs (a step never blocks on a read the worker can do); read it now otherwise."""
        if self.prefetcher is None or not self.running or record in self.prefetcher.cache:
            return False
        return self.prefetcher.cache.fits(record) and not self.prefetcher.has_failed(record)

    def _admit_waiting(self, budget: int) -> list[tuple[Sequence, int]]:
        scheduled = []
        limit, loads_left = self.config.max_adapters_per_batch, len(self.waiting)
        if self.config.max_adapter_loads_per_step is not None:
            loads_left = self.config.max_adapter_loads_per_step
        running_adapters = {_adapter_key(s) for s in self.running}
        for seq in self._order():
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            key = _adapter_key(seq)
            if limit is not None and key not in running_adapters \
                    and len(running_adapters) >= limit:
                continue  # another adapter's turn comes when the running ones drain
            record = seq.request.adapter
            needs_load = record is not None and not self.residency.is_resident(record)
            if needs_load and (loads_left <= 0 or self._must_wait_for_disk(record)):
                continue
            outcome = self._try_admit(seq, budget)
            if outcome == "full" or (outcome == "no_adapter_room"
                                     and is_aged(seq, self.num_steps, self.config.max_wait_steps)):
                break  # keep what frees up for this one: it has waited long enough
            if outcome == "no_adapter_room":
                loads_left = 0  # no other adapter fits either; requests on resident ones may
                continue
            self.waiting.remove(seq)
            if outcome == "failed":
                continue
            loads_left -= needs_load
            self.tenants.charge(seq.request.tenant, outcome)
            running_adapters.add(key)
            scheduled.append((seq, outcome))
            budget -= outcome
        return scheduled

    def _try_admit(self, seq: Sequence, budget: int) -> int | str:
        """Reserve pages (and the adapter) for `seq`'s first chunk: its size, `full` (no KV
        pages), `no_adapter_room` (no slot or pages for its adapter) or `failed` (the adapter
        could not be read: the sequence ends with the error)."""
        n = min(seq.num_uncomputed_tokens, budget)
        kv_pages = seq.page_table.num_missing_pages(self.kv_layout, seq.num_computed_tokens + n)
        record = seq.request.adapter
        if record is not None:
            if not self.residency.can_acquire(record, extra_pages=kv_pages):
                return "no_adapter_room" if not self.residency.is_resident(record) else "full"
            try:
                seq.adapter_slot = self.residency.acquire(
                    record, lambda r=record: self._load_adapter(r))
            except OutOfPagesError:
                return "no_adapter_room"
            except Exception as exc:  # the adapter's files changed under us: fail it alone
                logger.exception("request %s: adapter %s failed to load",
                                 seq.request.request_id, record.name)
                seq.error = exc
                self._forget(seq)
                seq.status, seq.finish_reason = RequestStatus.FAILED, "error"
                self.failed.append(seq)
                return "failed"
        if not self._grow(seq, seq.num_computed_tokens + n):
            self._release_adapter(seq)
            return "full"
        seq.status = RequestStatus.RUNNING
        self.running.append(seq)
        return n

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        missing = seq.page_table.num_missing_pages(self.kv_layout, num_tokens)
        if missing > self.pool.num_free_pages:
            self.residency.evict_idle(missing)
        if missing > self.pool.num_free_pages:
            return False
        seq.page_table.grow(self.pool, self.kv_layout, num_tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: free its K/V and adapter pin, back to the front of the queue."""
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = RequestStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)  # aged by its preemption: first within its tenant
        logger.debug("preempted %r", seq)

    def _release(self, seq: Sequence) -> None:
        seq.page_table.release(self.pool)
        self._release_adapter(seq)

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.adapter_slot >= 0:
            self.residency.release(seq.request.adapter)
            seq.adapter_slot = -1
