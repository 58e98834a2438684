"""Batch (scheduler → runner) and StepOutput (back): the contract of one engine step."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


@dataclass(slots=True)
class StepOutput:
    """What one step produced, per sampling sequence (same order as `Batch.sample_seq_ids`)."""

    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
