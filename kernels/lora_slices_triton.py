"""Triton twins of `lora_apply_ref` and `lora_apply_segments_ref`: all slices of a fused
projection in one shrink and one expand launch, DoRA's `g` in the expand epilogue.

Imports triton (through `lora_triton`); loaded only by `kernels.dispatch` and the interpreter
tests.
"""

from __future__ import annotations

import torch

from loraplex.kernels.lora_triton import (
    lora_expand_segments_slices_triton,
    lora_expand_slices_triton,
    lora_shrink_segments_slices_triton,
    lora_shrink_slices_triton,
)


def lora_apply_triton(x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor,
                      b_rows: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                      token_slots: torch.Tensor, out: torch.Tensor, slice_sizes: tuple[int, ...],
                      g_rows: torch.Tensor | None = None) -> None:
    """Triton twin of `lora_apply_ref` (same semantics and signature)."""
    h = lora_shrink_slices_triton(x, pool_flat, a_rows, ranks, token_slots)
    lora_expand_slices_triton(h, pool_flat, b_rows, ranks, scales, token_slots, out,
                              slice_sizes, g_rows=g_rows)


def lora_apply_segments_triton(x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor,
                               b_rows: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                               seg_starts: torch.Tensor, seg_slots: torch.Tensor,
                               out: torch.Tensor, slice_sizes: tuple[int, ...],
                               g_rows: torch.Tensor | None = None) -> None:
    """Triton twin of `lora_apply_segments_ref` (same semantics and signature)."""
    h = lora_shrink_segments_slices_triton(x, pool_flat, a_rows, ranks, seg_starts, seg_slots)
    lora_expand_segments_slices_triton(h, pool_flat, b_rows, ranks, scales, seg_starts,
                                       seg_slots, out, slice_sizes, g_rows=g_rows)
