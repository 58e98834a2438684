"""Triton twins of the LoRA ops in `lora.py`: shrink/expand for decode (BGMV) and prefill (SGMV).

A and Bᵀ rows are read in place from the flat page pool through the row tables, each adapter at
its own rank (no padding to the largest); several target slices (q|k|v, gate|up) may share one
launch (`*_slices_triton`); DoRA's row scale `g` can be applied in the expand epilogue.
Imports triton; loaded only by `kernels.dispatch` (CUDA) and by the interpreter tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.kernels.lora_segments_triton import (  # noqa: F401 (twins found here)
    block_map,
    lora_expand_segments_slices_triton,
    lora_expand_segments_triton,
    lora_shrink_segments_slices_triton,
    lora_shrink_segments_triton,
    shrink_segments_into,
)
from loraplex.kernels.lora_triton_common import (  # noqa: F401 (MAX_SLICES: public)
    MAX_SLICES,
    epilogue,
    g_row_args,
    load_rows,
    num_sms,
    padded_slice_sizes,
    row_tables,
    slice_columns,
    slot_scalars,
    vec_width,
)
from loraplex.kernels.tuning import launch


@triton.jit
def _shrink_kernel(x_ptr, pool_ptr, rows_ptr, ranks_ptr, slots_ptr, h_ptr,
                   d_in, max_rank, stride_xt, stride_rn, stride_rs, stride_kn, stride_hs,
                   stride_hn, stride_ht, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr, VEC: tl.constexpr):
    """One token × BLOCK_R rank rows × 1/SPLIT_K of d_in × one slice (Punica's BGMV shrink).

    Split `s` stores its partial sums in plane s of h with plain stores: no zeroed buffer, no
    atomics, the same sums on every run; the expand adds the planes up.
    """
    t, n = tl.program_id(0), tl.program_id(2)
    rb, split = tl.program_id(1) // SPLIT_K, tl.program_id(1) % SPLIT_K
    slot, rank, _ = slot_scalars(tl.load(slots_ptr + t), ranks_ptr + n * stride_kn, ranks_ptr,
                                 0, False)
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rank
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    if rb * BLOCK_R < rank:  # tokens without adapter and rows past the rank read nothing
        rows = tl.load(rows_ptr + n * stride_rn + slot * stride_rs + r, mask=live, other=0)
        k_per = tl.cdiv(d_in, SPLIT_K * BLOCK_K) * BLOCK_K
        k_lo = split * k_per
        for k0 in range(k_lo, tl.minimum(k_lo + k_per, d_in), BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + t * stride_xt + k, mask=k < d_in, other=0.0).to(tl.float32)
            a = load_rows(pool_ptr, rows, live, k, k < d_in, VEC).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
    h_ptrs = h_ptr + split * stride_hs + n * stride_hn + t * stride_ht + r
    tl.store(h_ptrs, acc, mask=r < max_rank)  # zeros too: every element of every plane


@triton.jit
def _expand_kernel(h_ptr, pool_ptr, rows_ptr, ranks_ptr, scales_ptr, slots_ptr, g_ptr, out_ptr,
                   d0, d1, d2, stride_hs, stride_hn, stride_ht, stride_rn, stride_rs, stride_kn,
                   stride_gn, stride_gs, stride_ot, stride_oc,
                   HAS_G: tl.constexpr, SPLIT: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_N: tl.constexpr, VEC: tl.constexpr):
    """One token × BLOCK_N output columns × one slice (Punica's BGMV expand), DoRA epilogue;
    h is the sum of SPLIT planes (the shrink's split-K partials; SPLIT = 1: h itself)."""
    t, nb, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d_out, col0 = slice_columns(n, d0, d1, d2)
    slot, rank, g_row = slot_scalars(tl.load(slots_ptr + t), ranks_ptr + n * stride_kn,
                                     g_ptr + n * stride_gn, stride_gs, HAS_G)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < d_out
    if ((rank > 0) | (g_row >= 0)) & (nb * BLOCK_N < d_out):
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            live = r < rank
            h_ptrs = h_ptr + n * stride_hn + t * stride_ht + r
            h = tl.load(h_ptrs, mask=live, other=0.0)
            for s in tl.static_range(1, SPLIT):  # unrolled; nothing at all when SPLIT == 1
                h += tl.load(h_ptrs + s * stride_hs, mask=live, other=0.0)
            rows = tl.load(rows_ptr + n * stride_rn + slot * stride_rs + r, mask=live, other=0)
            b = load_rows(pool_ptr, rows, live, cols, col_mask, VEC).to(tl.float32)
            acc += tl.sum(h[:, None] * b, axis=0)
        scale = tl.load(scales_ptr + n * stride_kn + slot)
        out_ptrs = out_ptr + t * stride_ot + (col0 + cols) * stride_oc
        epilogue(out_ptrs, col_mask, acc, scale, pool_ptr, g_row, cols, col_mask, HAS_G)


# ---- launchers ----------------------------------------------------------------------------------

def shrink_split_k(num_tokens: int, num_slices: int, max_rank: int, d_in: int,
                   device: torch.device, block_r: int = 16, block_k: int | None = None) -> int:
    """Split d_in until the grid has about `shrink_programs_per_sm` programs per SM (small
    decode batches), each part at least two blocks of d_in."""
    tuned = launch(device)
    block_k = block_k or tuned.shrink_block_k
    programs = num_tokens * num_slices * triton.cdiv(max_rank, block_r)
    split = 1
    while (programs * split < tuned.shrink_programs_per_sm * num_sms(device)
           and split * 2 * block_k <= d_in):
        split *= 2
    return split


def shrink_partials_into(partials: torch.Tensor, x: torch.Tensor, pool_flat: torch.Tensor,
                         a_rows: torch.Tensor, ranks: torch.Tensor, token_slots: torch.Tensor,
                         block_r: int = 16, block_k: int | None = None,
                         num_warps: int | None = None) -> None:
    """Decode shrink of NS slices with d_in split in SPLIT parts: partials [SPLIT, NS, T, R] fp32
    (last dim contiguous), plane s holding part s's sums; the planes add up to h [NS, T, R].

    Every element is written (zeros past a rank, without adapter, or for a part past d_in), so
    `partials` may come from torch.empty. block_k, num_warps: None takes `tuning.launch`'s.
    """
    split_k, num_slices, num_tokens, max_rank = partials.shape
    if num_tokens == 0 or max_rank == 0:
        return
    tuned = launch(x.device)
    block_k, num_warps = block_k or tuned.shrink_block_k, num_warps or tuned.shrink_warps
    assert partials.stride(3) == 1, f"partials strides {partials.stride()}: last must be 1"
    a_rows, ranks = row_tables(a_rows, ranks)
    x = x if x.stride(1) == 1 else x.contiguous()
    grid = (num_tokens, triton.cdiv(max_rank, block_r) * split_k, num_slices)
    _shrink_kernel[grid](
        x, pool_flat, a_rows, ranks, token_slots, partials, x.shape[1], max_rank, x.stride(0),
        a_rows.stride(0), a_rows.stride(1), ranks.stride(0), partials.stride(0),
        partials.stride(1), partials.stride(2), BLOCK_R=block_r, BLOCK_K=block_k,
        SPLIT_K=split_k, VEC=vec_width(pool_flat), num_warps=num_warps)


def shrink_into(h: torch.Tensor, x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor,
                ranks: torch.Tensor, token_slots: torch.Tensor, split_k: int = 1,
                block_r: int = 16, block_k: int | None = None,
                num_warps: int | None = None) -> None:
    """Decode shrink of NS slices into h [NS, T, R] fp32 (last dim contiguous), every element
    written. split_k > 1 sums `shrink_partials_into`'s planes into h: one launch more, which
    `lora_apply_triton` saves by handing the planes to the expand."""
    if split_k == 1:
        shrink_partials_into(h[None], x, pool_flat, a_rows, ranks, token_slots, block_r,
                             block_k, num_warps)
        return
    partials = h.new_empty((split_k, *h.shape))
    shrink_partials_into(partials, x, pool_flat, a_rows, ranks, token_slots, block_r, block_k,
                         num_warps)
    torch.sum(partials, 0, out=h)


def lora_shrink_partials_triton(x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor,
                                ranks: torch.Tensor, token_slots: torch.Tensor,
                                split_k: int | None = None) -> torch.Tensor:
    """New split-K partials [SPLIT, NS, T, R] fp32 of the NS-slice shrink (their sum is h);
    SPLIT is `shrink_split_k`'s choice unless given."""
    num_slices, max_rank = a_rows.shape[0], a_rows.shape[2]
    if split_k is None:
        split_k = shrink_split_k(x.shape[0], num_slices, max_rank, x.shape[1], x.device)
    partials = torch.empty((split_k, num_slices, x.shape[0], max_rank), dtype=torch.float32,
                           device=x.device)
    shrink_partials_into(partials, x, pool_flat, a_rows, ranks, token_slots)
    return partials


def lora_shrink_slices_triton(x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor,
                              ranks: torch.Tensor, token_slots: torch.Tensor,
                              split_k: int | None = None) -> torch.Tensor:
    """`lora_shrink_ref` for NS slices at once: a_rows [NS, S, R], ranks [NS, S] → [NS, T, R]."""
    partials = lora_shrink_partials_triton(x, pool_flat, a_rows, ranks, token_slots, split_k)
    return partials[0] if partials.shape[0] == 1 else partials.sum(0)


def lora_shrink_triton(x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor,
                       ranks: torch.Tensor, token_slots: torch.Tensor,
                       split_k: int | None = None) -> torch.Tensor:
    """Triton twin of `lora_shrink_ref` (same semantics and signature; split_k: a test knob)."""
    return lora_shrink_slices_triton(x, pool_flat, a_rows[None], ranks[None], token_slots,
                                     split_k)[0]


def lora_expand_slices_triton(h: torch.Tensor, pool_flat: torch.Tensor, b_rows: torch.Tensor,
                              ranks: torch.Tensor, scales: torch.Tensor,
                              token_slots: torch.Tensor, out: torch.Tensor,
                              slice_sizes: tuple[int, ...] | None = None,
                              g_rows: torch.Tensor | None = None, block_n: int | None = None,
                              block_r: int | None = None, num_warps: int | None = None) -> None:
    """`lora_expand_ref` for NS slices at once, each adding to its column range of `out`.

    h: [NS, T, R] fp32, or the shrink's split-K partials [SPLIT, NS, T, R] (summed);
    b_rows: [NS, S, R]; ranks, scales (and DoRA's g_rows, optional): [NS, S];
    out: [T, sum(slice_sizes)], written in place; with g_rows, out[t] of a DoRA slot is then
    scaled by g (dora_scale_ref fused into the epilogue). block_n, block_r, num_warps: None
    takes `tuning.launch`'s.
    """
    planes = h if h.dim() == 4 else h[None]  # [SPLIT, NS, T, R]
    num_slices, num_tokens = planes.shape[1], planes.shape[2]
    sizes = padded_slice_sizes(out, slice_sizes, num_slices)
    if num_tokens == 0 or max(sizes) == 0:
        return
    tuned = launch(out.device)
    block_n, block_r = block_n or tuned.expand_block_n, block_r or tuned.expand_block_r
    num_warps = num_warps or tuned.expand_warps
    b_rows, ranks = row_tables(b_rows, ranks)
    scales = scales.contiguous()
    g, stride_gn, stride_gs = g_row_args(g_rows, ranks)
    planes = planes if planes.stride(3) == 1 else planes.contiguous()
    grid = (num_tokens, triton.cdiv(max(sizes), block_n), num_slices)
    _expand_kernel[grid](
        planes, pool_flat, b_rows, ranks, scales, token_slots, g, out, *sizes, planes.stride(0),
        planes.stride(1), planes.stride(2), b_rows.stride(0), b_rows.stride(1), ranks.stride(0),
        stride_gn, stride_gs, out.stride(0), out.stride(1), HAS_G=g_rows is not None,
        SPLIT=planes.shape[0], BLOCK_R=block_r, BLOCK_N=block_n, VEC=vec_width(pool_flat),
        num_warps=num_warps)


def lora_expand_triton(h: torch.Tensor, pool_flat: torch.Tensor, b_rows: torch.Tensor,
                       ranks: torch.Tensor, scales: torch.Tensor, token_slots: torch.Tensor,
                       out: torch.Tensor, g_rows: torch.Tensor | None = None) -> None:
    """Triton twin of `lora_expand_ref`; with g_rows [S], also `dora_scale_ref` in the epilogue."""
    lora_expand_slices_triton(h[None], pool_flat, b_rows[None], ranks[None], scales[None],
                              token_slots, out, None, None if g_rows is None else g_rows[None])
