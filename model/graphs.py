"""CUDA graphs of decode steps: one captured forward per (batch bucket, with/without LoRA).

A decode step of a big model is hundreds of small launches (eager: launch-bound); replaying a
captured graph removes that overhead. A decode-only batch of B sequences is padded to the
smallest bucket >= B: pad rows get token 0, no KV write (slot -1), an empty context and no
adapter, so they touch nothing the real rows read. Inputs are copied into static buffers that
the graphs were captured on; the first batch of each key runs eagerly on those buffers (which
compiles and warms every kernel, and is that step's result) and is then captured. LoRA/DoRA
graphs read the residency's row tables in place (they are updated in place, never replaced);
batches with SHiRA tokens or prefill run eagerly. Imports `model.models.llama` only.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from loraplex.model.models.llama import ForwardContext, LlamaModel

if TYPE_CHECKING:
    from loraplex.scheduler.batch import Batch

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def buckets_up_to(max_batch: int) -> tuple[int, ...]:
    """The capture sizes for batches of at most `max_batch` sequences (it included)."""
    sizes = [b for b in BUCKETS if b < max_batch]
    return (*sizes, max_batch)


def is_decode_only(batch: "Batch") -> bool:
    """One token per sequence, and every sequence samples."""
    num_seqs = len(batch.seq_ids)
    return batch.num_tokens == num_seqs == len(batch.sample_seq_ids)


@dataclass(slots=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [bucket, vocab] written by each replay
    tables: object | None  # the row tables captured (their tensors must stay the same)


class DecodeGraphs:
    """Captures lazily, replays for decode-only batches; `run` returns None when it cannot."""

    def __init__(self, model: LlamaModel, max_batch: int, max_pages: int):
        self.model = model
        self.buckets = buckets_up_to(max_batch)
        self.max_pages = max_pages
        n, dev = self.buckets[-1], model.embed.device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros(n, max_pages, dtype=torch.int32, device=dev)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.token_slots = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=dev)
        self._graphs: dict[tuple[int, bool], _Captured] = {}
        self._mempool = torch.cuda.graph_pool_handle()
        self._pool_ptr: int | None = None
        self.num_replays = 0

    def bucket(self, num_seqs: int) -> int | None:
        for b in self.buckets:
            if b >= num_seqs:
                return b
        return None

    def run(self, batch: "Batch", kv_caches: list, pool_flat: torch.Tensor) -> torch.Tensor | None:
        """Logits [B, vocab] of a decode-only batch through a graph; None: run it eagerly."""
        if batch.shira_token_slots is not None or not is_decode_only(batch):
            return None
        num_seqs = len(batch.seq_ids)
        bucket = self.bucket(num_seqs)
        if bucket is None or batch.block_tables.shape[1] > self.max_pages:
            return None
        if self._pool_ptr != pool_flat.data_ptr():  # a new pool: every graph read the old one
            self._graphs.clear()
            self._pool_ptr = pool_flat.data_ptr()
        tables = batch.adapter_tables if batch.lora_token_slots is not None else None
        self._fill(batch, num_seqs, bucket)
        key = (bucket, tables is not None)
        captured = self._graphs.get(key)
        if captured is not None and captured.tables is tables:
            captured.graph.replay()
            self.num_replays += 1
            return captured.logits[:num_seqs].clone()
        ctx = self._context(bucket, kv_caches, pool_flat, tables)
        logits = self.model.forward(self.input_ids[:bucket], ctx, self.logits_indices[:bucket])
        self._capture(key, ctx, tables)
        return logits[:num_seqs]

    def _fill(self, batch: "Batch", num_seqs: int, bucket: int) -> None:
        """Copy the batch into the static buffers; rows num_seqs..bucket become padding."""
        n = num_seqs
        dev = self.input_ids.device

        def put(dst: torch.Tensor, src: torch.Tensor, pad: int) -> None:
            dst[:n].copy_(src.to(dev, non_blocking=True))
            dst[n:bucket].fill_(pad)

        put(self.input_ids, batch.input_ids, 0)
        put(self.positions, batch.positions, 0)
        put(self.slot_mapping, batch.slot_mapping, -1)  # pads write no KV
        put(self.context_lens, batch.context_lens, 0)  # pads attend to nothing
        if batch.lora_token_slots is not None:
            put(self.token_slots, batch.lora_token_slots, -1)
        width = batch.block_tables.shape[1]
        self.block_tables[:bucket].zero_()
        self.block_tables[:n, :width].copy_(batch.block_tables.to(dev, non_blocking=True))

    def _context(self, bucket: int, kv_caches: list, pool_flat: torch.Tensor,
                 tables: object | None) -> ForwardContext:
        return ForwardContext(
            positions=self.positions[:bucket],
            slot_mapping=self.slot_mapping[:bucket],
            block_tables=self.block_tables[:bucket],
            context_lens=self.context_lens[:bucket],
            query_start_loc=self.query_start_loc[:bucket + 1],
            kv_caches=kv_caches,
            pool_flat=pool_flat,
            tables=tables,
            lora_token_slots=None if tables is None else self.token_slots[:bucket],
            shira_token_slots=None,
            # DoRA's g always rides in the expand epilogue (-1 rows: not DoRA), so one graph
            # serves batches with and without DoRA adapters.
            has_dora=tables is not None,
        )

    def _capture(self, key: tuple[int, bool], ctx: ForwardContext, tables: object | None) -> None:
        t0 = time.perf_counter()
        bucket = key[0]
        graph = torch.cuda.CUDAGraph()
        # A garbage collection inside the capture could free another graph (of an engine no
        # longer referenced), whose reset is not permitted while a stream captures: collect
        # first, then keep the collector off until the capture ends.
        gc.collect()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
                logits = self.model.forward(self.input_ids[:bucket], ctx,
                                            self.logits_indices[:bucket])
        finally:
            gc.enable()
        self._graphs[key] = _Captured(graph, logits, tables)
        logger.info("captured a decode graph for %d sequences%s in %.0f ms", bucket,
                    " with adapters" if key[1] else "", (time.perf_counter() - t0) * 1e3)
