"""One whole LoRA (and DoRA) update of a fused projection: every slice, shrink then expand.

`lora_apply` (one adapter slot per token: decode and mixed steps) and `lora_apply_segments`
(runs of tokens that share a slot: prefill) add `scale · B A x` to each slice's columns of the
fused output (q|k|v, gate|up, or one module) and apply DoRA's row scale `g`. The references
compose the per-slice ops of `lora.py` and `dora.py`; the Triton twins do all slices in one
shrink and one expand launch with `g` in the expand epilogue. Imports only `kernels`.
"""

from __future__ import annotations

import torch

from loraplex.kernels.dispatch import INDEX_DTYPES, check, check_same_device, check_tensor, pick
from loraplex.kernels.dora import dora_scale_ref
from loraplex.kernels.lora import lora_expand_ref, lora_shrink_ref, segments_to_token_slots


def lora_apply_ref(x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor,
                   b_rows: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                   token_slots: torch.Tensor, out: torch.Tensor, slice_sizes: tuple[int, ...],
                   g_rows: torch.Tensor | None = None) -> None:
    """Semantics:  for each slice n with columns c_n = sum(slice_sizes[:n]) : + slice_sizes[n]:
                    h = lora_shrink_ref(x, pool_flat, a_rows[n], ranks[n], token_slots)
                    lora_expand_ref(h, pool_flat, b_rows[n], ranks[n], scales[n], token_slots,
                                    out[:, c_n])
                    if g_rows is not None: dora_scale_ref(out[:, c_n], pool_flat, g_rows[n],
                                                          token_slots)
    x: [T, d_in] pool dtype; a_rows, b_rows: [NS, S, R] int64; ranks: [NS, S]; scales: [NS, S]
    float32; token_slots: [T] int64 (-1: none); out: [T, >= sum(slice_sizes)] pool dtype, in
    place; g_rows: [NS, S] int64 (-1: slot not DoRA on that slice) or None.
    """
    start = 0
    for n, d_out in enumerate(slice_sizes):
        cols = out[:, start:start + d_out]
        h = lora_shrink_ref(x, pool_flat, a_rows[n], ranks[n], token_slots)
        lora_expand_ref(h, pool_flat, b_rows[n], ranks[n], scales[n], token_slots, cols)
        if g_rows is not None:
            dora_scale_ref(cols, pool_flat, g_rows[n], token_slots)
        start += d_out


def lora_apply_segments_ref(x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor,
                            b_rows: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                            seg_starts: torch.Tensor, seg_slots: torch.Tensor, out: torch.Tensor,
                            slice_sizes: tuple[int, ...],
                            g_rows: torch.Tensor | None = None) -> None:
    """Semantics:  lora_apply_ref with token_slots[t] = seg_slots[g] for t in
                    seg_starts[g] : seg_starts[g+1], and -1 outside every segment.
    seg_starts: [G+1] int64 non-decreasing; seg_slots: [G] int64; the rest as `lora_apply_ref`.
    """
    token_slots = segments_to_token_slots(seg_starts, seg_slots, x.shape[0])
    lora_apply_ref(x, pool_flat, a_rows, b_rows, ranks, scales, token_slots, out, slice_sizes,
                   g_rows)


def _check(x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor,
           ranks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor,
           slice_sizes: tuple[int, ...], g_rows: torch.Tensor | None) -> None:
    check_tensor("x", x, 2, pool_flat.dtype)
    check_tensor("out", out, 2, pool_flat.dtype)
    check_tensor("pool_flat", pool_flat, 1)
    check_tensor("a_rows", a_rows, 3, torch.int64)
    check_tensor("b_rows", b_rows, 3, torch.int64)
    check_tensor("ranks", ranks, 2, INDEX_DTYPES)
    check_tensor("scales", scales, 2, torch.float32)
    num_slices = len(slice_sizes)
    check(1 <= num_slices <= 3, lambda: f"1 to 3 slices, got {num_slices}")
    check(a_rows.shape == b_rows.shape and a_rows.shape[0] == num_slices,
          lambda: f"row tables {tuple(a_rows.shape)}, {tuple(b_rows.shape)} "
                  f"for {num_slices} slices")
    check(ranks.shape == scales.shape == a_rows.shape[:2], "ranks/scales disagree with tables")
    check(sum(slice_sizes) <= out.shape[1], lambda: f"slices {slice_sizes} wider than out")
    check(out.shape[0] == x.shape[0], "x and out disagree on tokens")
    if g_rows is not None:
        check_tensor("g_rows", g_rows, 2, torch.int64)
        check(g_rows.shape == ranks.shape, "g_rows disagree with ranks")
    check_same_device(x=x, pool_flat=pool_flat, a_rows=a_rows, out=out)


def lora_apply(x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor,
               b_rows: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
               token_slots: torch.Tensor, out: torch.Tensor, slice_sizes: tuple[int, ...],
               g_rows: torch.Tensor | None = None) -> None:
    """Checked entry point of `lora_apply_ref` (Triton on CUDA: one launch per stage).

    Reads no tensor value on the host, so it can be captured in a CUDA graph.
    """
    _check(x, pool_flat, a_rows, b_rows, ranks, scales, out, slice_sizes, g_rows)
    check_tensor("token_slots", token_slots, 1, INDEX_DTYPES)
    check(token_slots.shape[0] == x.shape[0], "token_slots and x disagree on tokens")
    if x.shape[0] == 0:
        return
    pick(lora_apply_ref, x.device)(x, pool_flat, a_rows, b_rows, ranks, scales, token_slots, out,
                                   tuple(slice_sizes), g_rows)


def lora_apply_segments(x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor,
                        b_rows: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                        seg_starts: torch.Tensor, seg_slots: torch.Tensor, out: torch.Tensor,
                        slice_sizes: tuple[int, ...], g_rows: torch.Tensor | None = None) -> None:
    """Checked entry point of `lora_apply_segments_ref` (prefill form).

    The segments must end within the tokens (not checked here: that would read a device value
    on the host once per projection).
    """
    _check(x, pool_flat, a_rows, b_rows, ranks, scales, out, slice_sizes, g_rows)
    check_tensor("seg_starts", seg_starts, 1, INDEX_DTYPES)
    check_tensor("seg_slots", seg_slots, 1, INDEX_DTYPES)
    check(seg_starts.shape[0] == seg_slots.shape[0] + 1,
          lambda: f"seg_starts {tuple(seg_starts.shape)} must have one more entry than seg_slots")
    if x.shape[0] == 0 or seg_slots.shape[0] == 0:
        return
    pick(lora_apply_segments_ref, x.device)(x, pool_flat, a_rows, b_rows, ranks, scales,
                                            seg_starts, seg_slots, out, tuple(slice_sizes),
                                            g_rows)
