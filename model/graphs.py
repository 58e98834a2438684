"""CUDA graphs of engine steps: one captured forward per (kind, size bucket, with/without LoRA).

A step of a big model is hundreds of small launches (eager: launch-bound); replaying a captured
graph removes that overhead. Every kernel takes its sizes from device tensors (block tables,
context lengths, query starts, segments), so only the token count and the sequence count are
baked into a graph:

- decode steps (one token per sequence, all sampling) of B sequences pad to a bucket Bb >= B;
- mixed steps (prefill chunks, with or without decode tokens) of T tokens pad to a token bucket
  Tb >= T, with the sequence count fixed at `max_batch + 1`: the extra sequence owns the pad
  tokens, the rest are empty. LoRA runs per sequence segment there.

Pad tokens get token 0, no KV write (slot -1), no adapter; pad sequences an empty context (their
attention reads nothing). Inputs are copied into static buffers the graphs were captured on;
the first step of each key runs eagerly on those buffers (which compiles and warms every kernel,
and is that step's result), then is captured. LoRA/DoRA graphs read the residency's row tables
in place (updated in place, never replaced), and launch only the projections that some adapter
of the batch targets (a graph per such set of modules, for the first `MAX_MODULE_SETS` sets;
later sets run every projection); SHiRA tokens gather through a static slot buffer of their own
(a graph per mix: LoRA, SHiRA, both).
Imports `model.config` and `model.models.llama` only.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from loraplex.model.config import TARGET_MODULES, module_indices
from loraplex.model.models.llama import ForwardContext, LlamaModel

if TYPE_CHECKING:
    from loraplex.scheduler.batch import Batch

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
TOKEN_BUCKETS = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
MAX_MODULE_SETS = 4  # graphs per (kind, size) for distinct sets of adapter-targeted modules


def buckets_up_to(limit: int, sizes: tuple[int, ...] = BUCKETS) -> tuple[int, ...]:
    """The capture sizes for at most `limit` (it included)."""
    return (*[b for b in sizes if b < limit], limit)


def is_decode_only(batch: "Batch") -> bool:
    """One token per sequence, and every sequence samples."""
    num_seqs = len(batch.seq_ids)
    return batch.num_tokens == num_seqs == len(batch.sample_seq_ids)


@dataclass(slots=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [rows, vocab] written by each replay
    tables: object | None  # the row tables captured (their tensors must stay the same)


GraphKey = tuple[str, int, bool, frozenset[int] | None, bool]
"""kind, size, LoRA tokens, adapter-targeted modules (None: all), SHiRA tokens."""


class StepGraphs:
    """Captures lazily, replays; `run` returns None for a step it leaves to the eager path."""

    def __init__(self, model: LlamaModel, max_batch: int, max_pages: int,
                 max_tokens: int = 0, *, capture: bool = True):
        """`capture=False` runs every step eagerly on the padded static buffers (no graphs):
        the padding, without CUDA, for tests."""
        self.model = model
        self.buckets = buckets_up_to(max_batch)
        self.token_buckets = buckets_up_to(max_tokens, TOKEN_BUCKETS) if max_tokens > 0 else ()
        self.max_pages = max_pages
        self.num_seqs = max_batch + 1  # mixed graphs: every real sequence, plus one for pads
        n = max((self.buckets[-1], *self.token_buckets))  # no token buckets: decode graphs only
        b, dev = self.num_seqs, model.embed.device
        # The static inputs, one flat buffer per dtype, each filled by one copy per step from a
        # pinned host twin (`_Staged`); block_tables last, so a step copies only its rows.
        self._i64 = _Staged(dict(input_ids=(n, 0), positions=(n, 0), slot_mapping=(n, -1),
                                 token_slots=(n, -1), shira_slots=(n, -1),
                                 logits_indices=(b, "arange"), seg_slots=(b, -1)),
                            torch.int64, dev, pin=capture)
        self._i32 = _Staged(dict(context_lens=(b, 0), query_start_loc=(b + 1, "arange"),
                                 block_tables=(b * max_pages, 0)),
                            torch.int32, dev, pin=capture)
        for name, view in (*self._i64.views.items(), *self._i32.views.items()):
            setattr(self, name, view)
        self.block_tables = self.block_tables.view(b, max_pages)
        # Decode graphs: sequence i is token i, and every token samples (never overwritten).
        self.decode_starts = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.decode_rows = torch.arange(n, dtype=torch.int64, device=dev)
        self._graphs: dict[GraphKey, _Captured] = {}
        self.module_sets: set[frozenset[int]] = set()
        self.capture = capture
        self._mempool = torch.cuda.graph_pool_handle() if capture else None
        self._pool_ptr: int | None = None
        self.num_steps = {"decode": 0, "mixed": 0, "shira": 0}  # steps run here (replayed or
        # not), by kind, and those with SHiRA tokens

    @staticmethod
    def _fit(n: int, sizes: tuple[int, ...]) -> int | None:
        return next((b for b in sizes if b >= n), None)

    def run(self, batch: "Batch", kv_caches: list, pool_flat: torch.Tensor) -> torch.Tensor | None:
        """Logits [len(batch.logits_indices), vocab] through a graph; None: run it eagerly."""
        if batch.block_tables.shape[1] > self.max_pages:
            return None
        decode = is_decode_only(batch)
        size = self._fit(len(batch.seq_ids), self.buckets) if decode \
            else self._fit(batch.num_tokens, self.token_buckets)
        num_rows = batch.logits_indices.shape[0]
        if size is None or (not decode and num_rows > self.num_seqs):
            return None
        if self._pool_ptr != pool_flat.data_ptr():  # a new pool: every graph read the old one
            self._graphs.clear()
            self._pool_ptr = pool_flat.data_ptr()
        lora = batch.lora_token_slots is not None
        shira = batch.shira_token_slots is not None
        tables = batch.adapter_tables if lora or shira else None
        if decode:
            self._fill_decode(batch, size)
        else:
            self._fill_mixed(batch, size)
        self._i64.flush()
        self._i32.flush()
        modules = self._modules(batch) if tables is not None else None
        key = ("decode" if decode else "mixed", size, lora, modules, shira)
        self.num_steps[key[0]] += 1
        self.num_steps["shira"] += shira
        captured = self._graphs.get(key)
        if captured is not None and captured.tables is tables:
            captured.graph.replay()
            return captured.logits[:num_rows].clone()
        ctx, rows = self._context(decode, size, kv_caches, pool_flat, tables, lora, shira)
        ctx.adapter_modules = modules
        logits = self.model.forward(self.input_ids[:size], ctx, rows)
        if self.capture:
            self._capture(key, ctx, rows, tables)
        return logits[:num_rows]

    def _modules(self, batch: "Batch") -> frozenset[int] | None:
        """The batch's adapter-targeted modules as a graph key; None (every projection) for a
        set past the first `MAX_MODULE_SETS` (bounds the graphs kept)."""
        if batch.adapter_modules is None:
            return None
        modules = module_indices(batch.adapter_modules)
        if modules not in self.module_sets and len(self.module_sets) >= MAX_MODULE_SETS:
            return None
        self.module_sets.add(modules)
        return modules

    def _fill_common(self, batch: "Batch", num_tokens: int, num_seqs: int) -> None:
        i64, i32 = self._i64, self._i32
        i64.wait_host()
        i32.wait_host()
        i64.put("input_ids", batch.input_ids, num_tokens, 0)
        i64.put("positions", batch.positions, num_tokens, 0)
        i64.put("slot_mapping", batch.slot_mapping, num_tokens, -1)  # pads write no KV
        if batch.lora_token_slots is not None:
            i64.put("token_slots", batch.lora_token_slots, num_tokens, -1)
        if batch.shira_token_slots is not None:
            i64.put("shira_slots", batch.shira_token_slots, num_tokens, -1)
        i32.put("context_lens", batch.context_lens, num_seqs, 0)  # pads attend to nothing
        rows = i32.host_view("block_tables", num_seqs * self.max_pages).view(num_seqs, -1)
        rows.zero_()
        rows[:len(batch.seq_ids), :batch.block_tables.shape[1]] = batch.block_tables

    def _fill_decode(self, batch: "Batch", bucket: int) -> None:
        """Decode rows num_seqs..bucket are pads (starts and logits rows: `decode_*`)."""
        self._fill_common(batch, bucket, bucket)

    def _fill_mixed(self, batch: "Batch", num_tokens: int) -> None:
        """Sequence B owns pad tokens T..Tb; sequences past it are empty."""
        self._fill_common(batch, num_tokens, self.num_seqs)
        self._i32.put("query_start_loc", batch.query_start_loc, self.num_seqs + 1, num_tokens)
        self._i64.put("logits_indices", batch.logits_indices, self.num_seqs, 0)
        if batch.lora_token_slots is not None:
            self._i64.put("seg_slots", batch.lora_sequence_slots(), self.num_seqs, -1)

    def _context(self, decode: bool, size: int, kv_caches: list, pool_flat: torch.Tensor,
                 tables: object | None, lora: bool,
                 shira: bool) -> tuple[ForwardContext, torch.Tensor]:
        """The forward's context on the static buffers, and the logits rows to compute."""
        num_seqs = size if decode else self.num_seqs
        starts = self.decode_starts if decode else self.query_start_loc
        rows = self.decode_rows[:size] if decode else self.logits_indices
        ctx = ForwardContext(
            positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:num_seqs],
            context_lens=self.context_lens[:num_seqs],
            query_start_loc=starts[:num_seqs + 1],
            kv_caches=kv_caches,
            pool_flat=pool_flat,
            tables=tables,
            lora_token_slots=self.token_slots[:size] if lora else None,
            shira_token_slots=self.shira_slots[:size] if shira else None,
            # DoRA's g always rides in the expand epilogue (-1 rows: not DoRA), so one graph
            # serves batches with and without DoRA adapters.
            has_dora=lora,
        )
        if not decode and lora:
            ctx.lora_seg_starts = ctx.query_start_loc
            ctx.lora_seg_slots = self.seg_slots
        return ctx, rows

    def _capture(self, key: GraphKey, ctx: ForwardContext, rows: torch.Tensor,
                 tables: object | None) -> None:
        t0 = time.perf_counter()
        size = key[1]
        graph = torch.cuda.CUDAGraph()
        # A garbage collection inside the capture could free another graph (of an engine no
        # longer referenced), whose reset is not permitted while a stream captures: collect
        # first, then keep the collector off until the capture ends.
        gc.collect()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
                logits = self.model.forward(self.input_ids[:size], ctx, rows)
        finally:
            gc.enable()
        self._graphs[key] = _Captured(graph, logits, tables)
        logger.info("captured a %s graph for %d %s%s in %.0f ms", key[0], size,
                    "sequences" if key[0] == "decode" else "tokens",
                    _adapters_note(key), (time.perf_counter() - t0) * 1e3)


class _Staged:
    """Static device buffers of one dtype as views of one flat tensor, written on a (pinned, on
    CUDA) host twin and sent with one copy per step: of the prefix up to the last section the
    step wrote, so a late section (block tables) costs only the part in use."""

    def __init__(self, sections: dict[str, tuple[int, int | str]], dtype: torch.dtype,
                 device: torch.device, pin: bool):
        total = sum(size for size, _ in sections.values())
        self.host = torch.empty(total, dtype=dtype, pin_memory=pin and device.type == "cuda")
        self.offsets: dict[str, int] = {}
        start = 0
        for name, (size, init) in sections.items():
            section = self.host[start:start + size]
            if init == "arange":
                torch.arange(size, out=section)
            else:
                section.fill_(init)
            self.offsets[name] = start
            start += size
        self.device_buf = self.host.to(device, copy=True)
        self.views = {name: self.device_buf[off:off + sections[name][0]]
                      for name, off in self.offsets.items()}
        self.end = 0  # the host prefix this step wrote, copied by `flush`
        self._sent = torch.cuda.Event() if pin and device.type == "cuda" else None

    def host_view(self, name: str, length: int) -> torch.Tensor:
        """The host twin of section `name`'s first `length` elements, marked for the copy."""
        start = self.offsets[name]
        self.end = max(self.end, start + length)
        return self.host[start:start + length]

    def put(self, name: str, src: torch.Tensor, end: int, pad: int) -> None:
        """section[:len(src)] = src; section[len(src):end] = pad (on the host)."""
        view, n = self.host_view(name, end), src.shape[0]
        view[:n] = src
        view[n:].fill_(pad)

    def wait_host(self) -> None:
        """Before writing the host twin: the last step's copy must have read it."""
        if self._sent is not None:
            self._sent.synchronize()

    def flush(self) -> None:
        if self.end:
            self.device_buf[:self.end].copy_(self.host[:self.end], non_blocking=True)
            if self._sent is not None:
                self._sent.record()
        self.end = 0


def _adapters_note(key: GraphKey) -> str:
    kinds = [name for name, on in (("LoRA", key[2]), ("SHiRA", key[4])) if on]
    if not kinds:
        return ""
    where = "" if key[3] is None else " on " + ",".join(TARGET_MODULES[m] for m in sorted(key[3]))
    return f" with {'+'.join(kinds)} adapters{where}"
