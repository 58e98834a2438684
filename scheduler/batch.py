"""Batch (scheduler → runner) and StepOutput (back): the contract of one engine step, and
`build_batch`, which the scheduler fills a Batch with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from loraplex.memory.kv import KVLayout
    from loraplex.scheduler.request import Sequence


@dataclass(slots=True)
class Batch:
    """Everything the runner needs for one forward, as tensors; filled by `Scheduler.schedule`.

    Tokens are laid out sequence after sequence; sequence b owns tokens
    `query_start_loc[b]:query_start_loc[b+1]`, the last of its `context_lens[b]` positions.
    """

    seq_ids: list[int]
    """Sequences in this step, in token order."""
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: page * page_size + offset where each K/V is written
    block_tables: torch.Tensor  # [B, max_pages] int32, padded with 0
    context_lens: torch.Tensor  # [B] int32: tokens of context after this step
    query_start_loc: torch.Tensor  # [B + 1] int32
    logits_indices: torch.Tensor  # [N] int64: tokens whose next-token logits are sampled
    sample_seq_ids: list[int]
    """The N sequences that sample this step, in the order of `logits_indices`."""
    lora_token_slots: torch.Tensor | None  # [T] int64 row-table slot (LoRA/DoRA), -1 none
    shira_token_slots: torch.Tensor | None  # [T] int64 row-table slot (SHiRA), -1 none
    has_dora: bool
    adapter_tables: object | None
    """`memory.adapters.AdapterTables` when any token has an adapter, else None."""
    pool: torch.Tensor
    """The page pool's tensor (never the `PagePool` object)."""
    adapter_modules: frozenset[str] | None = None
    """Target modules of the batch's adapters (the forward skips the others); None: all."""
    shira_fused: tuple[object, int] | None = None
    """(SHiRA adapter record, its slot) when every token runs that one adapter and the runner
    is to scatter it into the base weights for this step (SHiRA's fused mode); else None."""

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    def lora_sequence_slots(self) -> torch.Tensor:
        """[B] each sequence's LoRA slot (all its tokens share one: its first token's)."""
        first = self.query_start_loc[:-1].long().clamp(max=max(self.num_tokens - 1, 0))
        return self.lora_token_slots[first]

    def __repr__(self) -> str:
        return (f"Batch(seqs={len(self.seq_ids)}, tokens={self.num_tokens}, "
                f"sampling={len(self.sample_seq_ids)}, dora={self.has_dora})")


def build_batch(scheduled: list[tuple["Sequence", int]], layout: "KVLayout",
                adapter_tables: object, pool: torch.Tensor) -> Batch:
    """One step's Batch: (sequence, its token count this step) in token order; the residency's
    row tables (kept when a token has an adapter) and the pool's tensor.

    The tensors are built from Python lists once, not per sequence: at hundreds of sequences a
    step, per-sequence tensor ops cost milliseconds of host time.
    """
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    lora_slots: list[int] = []
    shira_slots: list[int] = []
    starts, context_lens, logits_indices, sample_ids = [0], [], [], []
    has_lora = has_shira = has_dora = False
    targets: set[str] = set()
    max_pages = max(len(s.page_table.pages) for s, _ in scheduled)
    table = np.zeros((len(scheduled), max_pages), dtype=np.int32)  # rows padded with 0
    for i, (seq, n) in enumerate(scheduled):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        input_ids += seq.token_ids(start, end)
        positions += range(start, end)
        slot_mapping += seq.page_table.slot_list(layout, start, end)
        row = seq.page_table.row()
        table[i, :row.shape[0]] = row
        context_lens.append(end)
        starts.append(starts[-1] + n)
        if end == seq.num_tokens:
            logits_indices.append(starts[-1] - 1)
            sample_ids.append(seq.seq_id)
        kind = seq.request.adapter.kind if seq.request.adapter else None
        targets.update(seq.request.adapter.target_modules if kind else ())
        is_lora = kind in ("lora", "dora")
        has_lora |= is_lora
        has_dora |= kind == "dora"
        has_shira |= kind == "shira"
        lora_slots += [seq.adapter_slot if is_lora else -1] * n
        shira_slots += [seq.adapter_slot if kind == "shira" else -1] * n

    block_tables = torch.from_numpy(table)
    return Batch(
        seq_ids=[s.seq_id for s, _ in scheduled],
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        positions=torch.tensor(positions, dtype=torch.int64),
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64),
        block_tables=block_tables,
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        logits_indices=torch.tensor(logits_indices, dtype=torch.int64),
        sample_seq_ids=sample_ids,
        lora_token_slots=torch.tensor(lora_slots, dtype=torch.int64) if has_lora else None,
        shira_token_slots=torch.tensor(shira_slots, dtype=torch.int64) if has_shira else None,
        has_dora=has_dora,
        adapter_tables=adapter_tables if (has_lora or has_shira) else None,
        pool=pool,
        adapter_modules=frozenset(targets),
    )


@dataclass(slots=True)
class StepOutput:
    """What one step produced, per sampling sequence (same order as `Batch.sample_seq_ids`)."""

    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
