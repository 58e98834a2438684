"""Scheduler: iteration-level continuous batching over the unified page pool.

Each step: every running sequence gets its next token (or prefill chunk) first, oldest first;
then waiting sequences are admitted while the token budget, the sequence cap and the pool allow.
When pages run out, idle adapters are evicted, then the newest running sequence is preempted
(its K/V freed, recomputed later). Knows pages and token ids, never tensors' contents.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import torch

from loraplex.memory.adapters import AdapterResidency
from loraplex.memory.host_cache import AdapterRecord
from loraplex.memory.kv import KVLayout
from loraplex.memory.pool import OutOfPagesError, PagePool
from loraplex.model.adapters.canonical import AdapterWeights
from loraplex.scheduler.batch import Batch, StepOutput
from loraplex.scheduler.config import SchedulerConfig
from loraplex.scheduler.request import RequestStatus, Sequence

logger = logging.getLogger(__name__)


def _adapter_key(seq: Sequence) -> int:
    return -1 if seq.request.adapter is None else seq.request.adapter.uid


class Scheduler:
    """Owns the waiting queue and the running set; builds one `Batch` per step."""

    def __init__(self, config: SchedulerConfig, pool: PagePool, kv_layout: KVLayout,
                 residency: AdapterResidency,
                 load_adapter: Callable[[AdapterRecord], AdapterWeights],
                 eos_token_ids: tuple[int, ...], max_model_len: int):
        self.config = config
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
        seq.status, seq.finish_reason = status, reason

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> Batch | None:
        """Pick this step's work and reserve its pages; None when there is nothing to run."""
        budget = self.config.max_num_batched_tokens
        scheduled, budget, preempted = self._schedule_running(budget)
        if not preempted:
            scheduled += self._admit_waiting(budget)
        if not scheduled:
            return None
        return self._build_batch(scheduled)

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
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
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

    def _admit_waiting(self, budget: int) -> list[tuple[Sequence, int]]:
        scheduled = []
        limit = self.config.max_adapters_per_batch
        running_adapters = {_adapter_key(s) for s in self.running}
        idx = 0
        while idx < len(self.waiting) and budget > 0 \
                and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[idx]
            key = _adapter_key(seq)
            if limit is not None and key not in running_adapters \
                    and len(running_adapters) >= limit:
                idx += 1  # another adapter's turn comes when the running ones drain
                continue
            outcome = self._try_admit(seq, budget)
            if outcome == "full":
                break
            del self.waiting[idx]
            if outcome == "failed":
                continue
            running_adapters.add(key)
            scheduled.append((seq, outcome))
            budget -= outcome
        return scheduled

    def _try_admit(self, seq: Sequence, budget: int) -> int | str:
        """Reserve pages (and the adapter) for `seq`'s first chunk: its size, `full` or
        `failed` (the adapter could not be read: the sequence ends with the error)."""
        n = min(seq.num_uncomputed_tokens, budget)
        kv_pages = seq.page_table.num_missing_pages(self.kv_layout, seq.num_computed_tokens + n)
        record = seq.request.adapter
        if record is not None:
            if not self.residency.can_acquire(record, extra_pages=kv_pages):
                return "full"
            try:
                seq.adapter_slot = self.residency.acquire(
                    record, lambda r=record: self._load_adapter(r))
            except OutOfPagesError:
                return "full"
            except Exception as exc:  # the adapter's files changed under us: fail it alone
                logger.exception("request %s: adapter %s failed to load",
                                 seq.request.request_id, record.name)
                seq.error = exc
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
        self.waiting.appendleft(seq)
        logger.debug("preempted %r", seq)

    def _release(self, seq: Sequence) -> None:
        seq.page_table.release(self.pool)
        self._release_adapter(seq)

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.adapter_slot >= 0:
            self.residency.release(seq.request.adapter)
            seq.adapter_slot = -1

    def _build_batch(self, scheduled: list[tuple[Sequence, int]]) -> Batch:
        layout = self.kv_layout
        input_ids: list[int] = []
        positions, slot_mapping, lora_slots, shira_slots = [], [], [], []
        starts, context_lens, logits_indices, sample_ids = [0], [], [], []
        has_lora = has_shira = has_dora = False
        max_pages = max(len(s.page_table.pages) for s, _ in scheduled)
        block_tables = torch.zeros(len(scheduled), max_pages, dtype=torch.int32)
        for b, (seq, n) in enumerate(scheduled):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids += seq.token_ids(start, end)
            positions.append(torch.arange(start, end))
            slot_mapping.append(seq.page_table.slots(layout, start, end))
            block_tables[b, : len(seq.page_table.pages)] = torch.tensor(seq.page_table.pages)
            context_lens.append(end)
            starts.append(starts[-1] + n)
            if end == seq.num_tokens:
                logits_indices.append(starts[-1] - 1)
                sample_ids.append(seq.seq_id)
            kind = seq.request.adapter.kind if seq.request.adapter else None
            has_lora |= kind in ("lora", "dora")
            has_dora |= kind == "dora"
            has_shira |= kind == "shira"
            lora_slots.append((n, seq.adapter_slot if kind in ("lora", "dora") else -1))
            shira_slots.append((n, seq.adapter_slot if kind == "shira" else -1))

        def per_token(pairs: list[tuple[int, int]]) -> torch.Tensor:
            counts = torch.tensor([c for c, _ in pairs])
            return torch.tensor([s for _, s in pairs], dtype=torch.int64).repeat_interleave(counts)

        return Batch(
            seq_ids=[s.seq_id for s, _ in scheduled],
            input_ids=torch.tensor(input_ids, dtype=torch.int64),
            positions=torch.cat(positions),
            slot_mapping=torch.cat(slot_mapping),
            block_tables=block_tables,
            context_lens=torch.tensor(context_lens, dtype=torch.int32),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            logits_indices=torch.tensor(logits_indices, dtype=torch.int64),
            sample_seq_ids=sample_ids,
            lora_token_slots=per_token(lora_slots) if has_lora else None,
            shira_token_slots=per_token(shira_slots) if has_shira else None,
            has_dora=has_dora,
            adapter_tables=self.residency.tables if (has_lora or has_shira) else None,
            pool=self.pool.tensor,
        )
