"""Triton twins of `lora_apply_ref` and `lora_apply_segments_ref`: all slices of a fused
projection in one shrink and one expand launch, DoRA's `g` in the expand epilogue.

Imports triton (through `lora_triton`); loaded only by `kernels.dispatch` and the interpreter
tests.
"""

from __future__ import annotations

import torch

from loraplex.kernels.dispatch import memoized
from loraplex.kernels.lora_triton import (
    block_map,
    lora_expand_segments_slices_triton,
    lora_expand_slices_triton,
    lora_shrink_partials_triton,
    shrink_segments_into,
)


def lora_apply_triton(x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor,
                      b_rows: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                      token_slots: torch.Tensor, out: torch.Tensor, slice_sizes: tuple[int, ...],
                      g_rows: torch.Tensor | None = None, split_k: int | None = None) -> None:
    """Triton twin of `lora_apply_ref` (same semantics and signature; split_k: a test knob).

    Two launches: the shrink's split-K partial planes go straight to the expand, which sums them
    as it loads h (no zeroed buffer, no atomics, no separate reduction).
    """
    partials = lora_shrink_partials_triton(x, pool_flat, a_rows, ranks, token_slots, split_k)
    lora_expand_slices_triton(partials, pool_flat, b_rows, ranks, scales, token_slots, out,
                              slice_sizes, g_rows=g_rows)


def lora_apply_segments_triton(x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor,
                               b_rows: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                               seg_starts: torch.Tensor, seg_slots: torch.Tensor,
                               out: torch.Tensor, slice_sizes: tuple[int, ...],
                               g_rows: torch.Tensor | None = None) -> None:
    """Triton twin of `lora_apply_segments_ref` (same semantics and signature).

    One block map serves both launches, and every projection of the step (step memo). h needs
    no zeros: the expand reads h only at tokens
    inside segments with an adapter, below their rank, all of which the shrink writes (it writes
    every rank < R of every token inside a segment, and both walk the same map).
    """
    num_tokens = x.shape[0]
    if num_tokens == 0 or seg_slots.shape[0] == 0:
        return
    segment_map = memoized("lora_segment_blocks", seg_starts, (num_tokens,),
                           lambda: block_map(seg_starts, num_tokens))
    h = torch.empty((a_rows.shape[0], num_tokens, a_rows.shape[2]), dtype=torch.float32,
                    device=x.device)
    shrink_segments_into(h, x, pool_flat, a_rows, ranks, seg_starts, seg_slots,
                         segment_map=segment_map)
    lora_expand_segments_slices_triton(h, pool_flat, b_rows, ranks, scales, seg_starts,
                                       seg_slots, out, slice_sizes, g_rows=g_rows,
                                       segment_map=segment_map)
