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

MAX_SLICES = 3  # q|k|v is the widest fused projection


@triton.jit
def load_rows(pool_ptr, rows, row_mask, cols, col_mask, VEC: tl.constexpr):
    """Tile `pool[rows[i] + cols[j]]`, masked; 16-byte loads when every live row starts aligned.

    The row offsets come from memory, so the compiler cannot know their alignment; a uniform
    branch on the actual offsets proves it without trusting the caller.
    """
    mask = row_mask[:, None] & col_mask[None, :]
    misaligned = tl.max(tl.where(row_mask, rows % VEC, 0), axis=0)
    if misaligned == 0:
        # (rows // VEC) * VEC equals rows here and proves the alignment to the compiler; a
        # tl.multiple_of hint would be folded away with the branch (both loads look the same).
        aligned = (rows // VEC) * VEC
        tile = tl.load(pool_ptr + aligned[:, None] + cols[None, :], mask=mask, other=0.0)
    else:
        tile = tl.load(pool_ptr + rows[:, None] + cols[None, :], mask=mask, other=0.0)
    return tile


@triton.jit
def slot_scalars(slot, ranks_ptr, g_ptr, stride_g, HAS_G: tl.constexpr):
    """(slot clamped to ≥ 0, rank (0 without adapter), DoRA g row (-1: none))."""
    has = slot >= 0
    safe = tl.where(has, slot, 0)
    rank = tl.where(has, tl.load(ranks_ptr + safe), 0)
    g_row = -1
    if HAS_G:
        g_row = tl.where(has, tl.load(g_ptr + safe * stride_g), -1)
    return safe, rank, g_row


@triton.jit
def slice_columns(n, d0, d1, d2):
    """(d_out, first column in `out`) of slice n of the fused output."""
    d_out = tl.where(n == 0, d0, tl.where(n == 1, d1, d2))
    col0 = tl.where(n == 0, 0, tl.where(n == 1, d0, d0 + d1))
    return d_out, col0


@triton.jit
def epilogue(out_ptrs, out_mask, delta, scale, pool_ptr, g_row, cols, col_mask,
             HAS_G: tl.constexpr):
    """out += scale · delta, rounded to out's dtype; then × g (DoRA), rounded again (as the ref)."""
    o = tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32) + delta * scale
    o = o.to(out_ptrs.dtype.element_ty)
    if HAS_G:
        if g_row >= 0:
            g = tl.load(pool_ptr + g_row + cols, mask=col_mask, other=0.0).to(tl.float32)
            o = (o.to(tl.float32) * g).to(out_ptrs.dtype.element_ty)
    tl.store(out_ptrs, o, mask=out_mask)


@triton.jit
def _shrink_kernel(x_ptr, pool_ptr, rows_ptr, ranks_ptr, slots_ptr, h_ptr,
                   d_in, max_rank, stride_xt, stride_rn, stride_rs, stride_kn, stride_hn,
                   stride_ht, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr, VEC: tl.constexpr):
    """One token × BLOCK_R rank rows × 1/SPLIT_K of d_in × one slice (Punica's BGMV shrink)."""
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
    h_ptrs = h_ptr + n * stride_hn + t * stride_ht + r
    if SPLIT_K == 1:
        tl.store(h_ptrs, acc, mask=r < max_rank)  # zeros too: every element is written
    else:
        tl.atomic_add(h_ptrs, acc, mask=live)


@triton.jit
def _expand_kernel(h_ptr, pool_ptr, rows_ptr, ranks_ptr, scales_ptr, slots_ptr, g_ptr, out_ptr,
                   d0, d1, d2, stride_hn, stride_ht, stride_rn, stride_rs, stride_kn,
                   stride_gn, stride_gs, stride_ot, stride_oc,
                   HAS_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                   VEC: tl.constexpr):
    """One token × BLOCK_N output columns × one slice (Punica's BGMV expand), DoRA epilogue."""
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
            h = tl.load(h_ptr + n * stride_hn + t * stride_ht + r, mask=live, other=0.0)
            rows = tl.load(rows_ptr + n * stride_rn + slot * stride_rs + r, mask=live, other=0)
            b = load_rows(pool_ptr, rows, live, cols, col_mask, VEC).to(tl.float32)
            acc += tl.sum(h[:, None] * b, axis=0)
        scale = tl.load(scales_ptr + n * stride_kn + slot)
        out_ptrs = out_ptr + t * stride_ot + (col0 + cols) * stride_oc
        epilogue(out_ptrs, col_mask, acc, scale, pool_ptr, g_row, cols, col_mask, HAS_G)


@triton.jit
def _segment_of_block(block_seg_ptr, block_first_ptr, seg_starts_ptr, seg_slots_ptr, num_segs,
                      BLOCK_M: tl.constexpr):
    """(segment, its slot, token rows of this program, their mask) for program_id(0)."""
    p = tl.program_id(0)
    seg = tl.minimum(tl.load(block_seg_ptr + p), num_segs - 1)
    valid = tl.load(block_seg_ptr + p) < num_segs
    j = p - tl.load(block_first_ptr + seg)
    start = tl.load(seg_starts_ptr + seg)
    end = tl.where(valid, tl.load(seg_starts_ptr + seg + 1), start)  # idle program: no rows
    m = start + j * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.where(valid, tl.load(seg_slots_ptr + seg), -1)
    return slot, m, m < end


@triton.jit
def _shrink_segments_kernel(x_ptr, pool_ptr, rows_ptr, ranks_ptr, seg_starts_ptr, seg_slots_ptr,
                            block_seg_ptr, block_first_ptr, h_ptr, num_segs, d_in, max_rank,
                            stride_xt, stride_rn, stride_rs, stride_kn, stride_hn, stride_ht,
                            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                            VEC: tl.constexpr, PRECISION: tl.constexpr):
    """BLOCK_M tokens of one segment × BLOCK_R rank rows × one slice (S-LoRA's SGMV shrink)."""
    rb, n = tl.program_id(1), tl.program_id(2)
    seg_slot, m, m_mask = _segment_of_block(block_seg_ptr, block_first_ptr, seg_starts_ptr,
                                            seg_slots_ptr, num_segs, BLOCK_M)
    slot, rank, _ = slot_scalars(seg_slot, ranks_ptr + n * stride_kn, ranks_ptr, 0, False)
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rank
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    if rb * BLOCK_R < rank:
        rows = tl.load(rows_ptr + n * stride_rn + slot * stride_rs + r, mask=live, other=0)
        for k0 in range(0, d_in, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m[:, None] * stride_xt + k[None, :],
                        mask=m_mask[:, None] & (k < d_in)[None, :], other=0.0)
            a = load_rows(pool_ptr, rows, live, k, k < d_in, VEC)
            acc = tl.dot(x, tl.trans(a), acc, input_precision=PRECISION)
    h_ptrs = h_ptr + n * stride_hn + m[:, None] * stride_ht + r[None, :]
    tl.store(h_ptrs, acc, mask=m_mask[:, None] & (r < max_rank)[None, :])


@triton.jit
def _expand_segments_kernel(h_ptr, pool_ptr, rows_ptr, ranks_ptr, scales_ptr, seg_starts_ptr,
                            seg_slots_ptr, block_seg_ptr, block_first_ptr, g_ptr, out_ptr,
                            num_segs, d0, d1, d2, stride_hn, stride_ht, stride_rn, stride_rs,
                            stride_kn, stride_gn, stride_gs, stride_ot, stride_oc,
                            HAS_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_N: tl.constexpr, VEC: tl.constexpr, PRECISION: tl.constexpr):
    """BLOCK_M tokens of one segment × BLOCK_N columns × one slice (SGMV expand), DoRA epilogue."""
    nb, n = tl.program_id(1), tl.program_id(2)
    d_out, col0 = slice_columns(n, d0, d1, d2)
    seg_slot, m, m_mask = _segment_of_block(block_seg_ptr, block_first_ptr, seg_starts_ptr,
                                            seg_slots_ptr, num_segs, BLOCK_M)
    slot, rank, g_row = slot_scalars(seg_slot, ranks_ptr + n * stride_kn, g_ptr + n * stride_gn,
                                     stride_gs, HAS_G)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < d_out
    if (seg_slot >= 0) & ((rank > 0) | (g_row >= 0)) & (nb * BLOCK_N < d_out):
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            live = r < rank
            h = tl.load(h_ptr + n * stride_hn + m[:, None] * stride_ht + r[None, :],
                        mask=m_mask[:, None] & live[None, :], other=0.0)
            rows = tl.load(rows_ptr + n * stride_rn + slot * stride_rs + r, mask=live, other=0)
            b = load_rows(pool_ptr, rows, live, cols, col_mask, VEC).to(tl.float32)
            acc = tl.dot(h, b, acc, input_precision=PRECISION)
        scale = tl.load(scales_ptr + n * stride_kn + slot)
        out_ptrs = out_ptr + m[:, None] * stride_ot + (col0 + cols)[None, :] * stride_oc
        epilogue(out_ptrs, m_mask[:, None] & col_mask[None, :], acc, scale, pool_ptr, g_row,
                 cols[None, :], col_mask[None, :], HAS_G)


# ---- launchers ----------------------------------------------------------------------------------

def _vec(pool_flat: torch.Tensor) -> int:
    return max(1, 16 // pool_flat.element_size())


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _tables(rows: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row tables with a slice axis [NS, S, R] (last dim contiguous) and ranks [NS, S]."""
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if ranks.stride(-1) != 1:
        ranks = ranks.contiguous()
    return rows, ranks


def shrink_split_k(num_tokens: int, num_slices: int, max_rank: int, d_in: int,
                   device: torch.device, block_r: int = 16, block_k: int = 256) -> int:
    """Split d_in until the grid has ~4 programs per SM (small decode batches)."""
    programs = num_tokens * num_slices * triton.cdiv(max_rank, block_r)
    split = 1
    while programs * split < 4 * _num_sms(device) and split * 2 * block_k <= d_in:
        split *= 2
    return split


def shrink_into(h: torch.Tensor, x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor,
                ranks: torch.Tensor, token_slots: torch.Tensor, split_k: int = 1,
                block_r: int = 16, block_k: int = 256, num_warps: int = 4) -> None:
    """Decode shrink of NS slices into h [NS, T, R] fp32 (last dim contiguous).

    split_k == 1 writes every element (zeros past a rank or without adapter); split_k > 1 adds
    with atomics, so h must hold zeros.
    """
    num_slices, num_tokens, max_rank = h.shape
    if num_tokens == 0 or max_rank == 0:
        return
    a_rows, ranks = _tables(a_rows, ranks)
    x = x if x.stride(1) == 1 else x.contiguous()
    grid = (num_tokens, triton.cdiv(max_rank, block_r) * split_k, num_slices)
    _shrink_kernel[grid](
        x, pool_flat, a_rows, ranks, token_slots, h, x.shape[1], max_rank, x.stride(0),
        a_rows.stride(0), a_rows.stride(1), ranks.stride(0), h.stride(0), h.stride(1),
        BLOCK_R=block_r, BLOCK_K=block_k, SPLIT_K=split_k, VEC=_vec(pool_flat),
        num_warps=num_warps)


def lora_shrink_slices_triton(x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor,
                              ranks: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """`lora_shrink_ref` for NS slices at once: a_rows [NS, S, R], ranks [NS, S] → [NS, T, R]."""
    num_slices, max_rank = a_rows.shape[0], a_rows.shape[2]
    split = shrink_split_k(x.shape[0], num_slices, max_rank, x.shape[1], x.device)
    alloc = torch.empty if split == 1 else torch.zeros
    h = alloc((num_slices, x.shape[0], max_rank), dtype=torch.float32, device=x.device)
    shrink_into(h, x, pool_flat, a_rows, ranks, token_slots, split_k=split)
    return h


def lora_shrink_triton(x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor,
                       ranks: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """Triton twin of `lora_shrink_ref` (same semantics and signature)."""
    return lora_shrink_slices_triton(x, pool_flat, a_rows[None], ranks[None], token_slots)[0]


def _slice_sizes(out: torch.Tensor, slice_sizes: tuple[int, ...] | None, num_slices: int):
    sizes = tuple(slice_sizes) if slice_sizes is not None else (out.shape[1],)
    assert len(sizes) == num_slices <= MAX_SLICES, f"{num_slices} slices, sizes {sizes}"
    assert sum(sizes) <= out.shape[1], f"slices {sizes} wider than out {tuple(out.shape)}"
    return sizes + (0,) * (MAX_SLICES - len(sizes))


def _g_args(g_rows: torch.Tensor | None, like: torch.Tensor):
    if g_rows is None:
        return like, 0, 0
    g_rows = g_rows.reshape(-1, g_rows.shape[-1])
    return g_rows, g_rows.stride(0), g_rows.stride(1)


def lora_expand_slices_triton(h: torch.Tensor, pool_flat: torch.Tensor, b_rows: torch.Tensor,
                              ranks: torch.Tensor, scales: torch.Tensor,
                              token_slots: torch.Tensor, out: torch.Tensor,
                              slice_sizes: tuple[int, ...] | None = None,
                              g_rows: torch.Tensor | None = None, block_n: int = 128,
                              block_r: int = 16, num_warps: int = 4) -> None:
    """`lora_expand_ref` for NS slices at once, each adding to its column range of `out`.

    h: [NS, T, R] fp32; b_rows: [NS, S, R]; ranks, scales (and DoRA's g_rows, optional): [NS, S];
    out: [T, sum(slice_sizes)], written in place; with g_rows, out[t] of a DoRA slot is then
    scaled by g (dora_scale_ref fused into the epilogue).
    """
    num_slices, num_tokens = h.shape[0], h.shape[1]
    sizes = _slice_sizes(out, slice_sizes, num_slices)
    if num_tokens == 0 or max(sizes) == 0:
        return
    b_rows, ranks = _tables(b_rows, ranks)
    scales = scales.contiguous()
    g, stride_gn, stride_gs = _g_args(g_rows, ranks)
    h = h if h.stride(2) == 1 else h.contiguous()
    grid = (num_tokens, triton.cdiv(max(sizes), block_n), num_slices)
    _expand_kernel[grid](
        h, pool_flat, b_rows, ranks, scales, token_slots, g, out, *sizes, h.stride(0),
        h.stride(1), b_rows.stride(0), b_rows.stride(1), ranks.stride(0), stride_gn, stride_gs,
        out.stride(0), out.stride(1), HAS_G=g_rows is not None, BLOCK_R=block_r,
        BLOCK_N=block_n, VEC=_vec(pool_flat), num_warps=num_warps)


def lora_expand_triton(h: torch.Tensor, pool_flat: torch.Tensor, b_rows: torch.Tensor,
                       ranks: torch.Tensor, scales: torch.Tensor, token_slots: torch.Tensor,
                       out: torch.Tensor, g_rows: torch.Tensor | None = None) -> None:
    """Triton twin of `lora_expand_ref`; with g_rows [S], also `dora_scale_ref` in the epilogue."""
    lora_expand_slices_triton(h[None], pool_flat, b_rows[None], ranks[None], scales[None],
                              token_slots, out, None, None if g_rows is None else g_rows[None])


# ---- prefill (segments) -------------------------------------------------------------------------

def block_map(seg_starts: torch.Tensor, num_tokens: int,
              block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(segment of each program [P], first program of each segment [G], P), on the device.

    P = cdiv(T, BLOCK_M) + G bounds Σ cdiv(len_g, BLOCK_M) without reading lengths on the host
    (no sync); programs past the last segment exit at once.
    """
    starts = seg_starts.long()
    lengths = (starts[1:] - starts[:-1]).clamp(min=0)
    num_blocks = (lengths + block_m - 1) // block_m
    block_end = torch.cumsum(num_blocks, 0)
    grid = triton.cdiv(num_tokens, block_m) + lengths.shape[0]
    programs = torch.arange(grid, device=seg_starts.device)
    return torch.searchsorted(block_end, programs, right=True), block_end - num_blocks, grid


def _precision(pool_flat: torch.Tensor) -> str:
    """fp32 pools: exact fp32 dots (the 1e-4 contract); 16-bit pools: tf32 for the fp32 h."""
    return "ieee" if pool_flat.dtype == torch.float32 else "tf32"


def shrink_segments_into(h: torch.Tensor, x: torch.Tensor, pool_flat: torch.Tensor,
                         a_rows: torch.Tensor, ranks: torch.Tensor, seg_starts: torch.Tensor,
                         seg_slots: torch.Tensor, block_m: int = 32, block_k: int = 64) -> None:
    """Prefill shrink of NS slices into h [NS, T, R]: writes every element of tokens inside a
    segment (zeros past the rank or for slot -1); tokens outside all segments are not touched."""
    num_slices, num_tokens, max_rank = h.shape
    num_segs = seg_slots.shape[0]
    if num_tokens == 0 or max_rank == 0 or num_segs == 0:
        return
    a_rows, ranks = _tables(a_rows, ranks)
    x = x if x.stride(1) == 1 else x.contiguous()
    block_r = min(64, max(16, triton.next_power_of_2(max_rank)))
    block_seg, block_first, num_programs = block_map(seg_starts, num_tokens, block_m)
    grid = (num_programs, triton.cdiv(max_rank, block_r), num_slices)
    _shrink_segments_kernel[grid](
        x, pool_flat, a_rows, ranks, seg_starts, seg_slots, block_seg, block_first, h, num_segs,
        x.shape[1], max_rank, x.stride(0), a_rows.stride(0), a_rows.stride(1), ranks.stride(0),
        h.stride(0), h.stride(1), BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
        VEC=_vec(pool_flat), PRECISION=_precision(pool_flat), num_warps=4)


def lora_shrink_segments_slices_triton(x: torch.Tensor, pool_flat: torch.Tensor,
                                       a_rows: torch.Tensor, ranks: torch.Tensor,
                                       seg_starts: torch.Tensor,
                                       seg_slots: torch.Tensor) -> torch.Tensor:
    """`lora_shrink_segments_ref` for NS slices: a_rows [NS, S, R], ranks [NS, S] → [NS, T, R]."""
    h = torch.zeros((a_rows.shape[0], x.shape[0], a_rows.shape[2]), dtype=torch.float32,
                    device=x.device)
    shrink_segments_into(h, x, pool_flat, a_rows, ranks, seg_starts, seg_slots)
    return h


def lora_shrink_segments_triton(x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor,
                                ranks: torch.Tensor, seg_starts: torch.Tensor,
                                seg_slots: torch.Tensor) -> torch.Tensor:
    """Triton twin of `lora_shrink_segments_ref` (same semantics and signature)."""
    return lora_shrink_segments_slices_triton(x, pool_flat, a_rows[None], ranks[None],
                                              seg_starts, seg_slots)[0]


def lora_expand_segments_slices_triton(h: torch.Tensor, pool_flat: torch.Tensor,
                                       b_rows: torch.Tensor, ranks: torch.Tensor,
                                       scales: torch.Tensor, seg_starts: torch.Tensor,
                                       seg_slots: torch.Tensor, out: torch.Tensor,
                                       slice_sizes: tuple[int, ...] | None = None,
                                       g_rows: torch.Tensor | None = None, block_m: int = 32,
                                       block_n: int = 64) -> None:
    """`lora_expand_segments_ref` for NS slices (shapes as `lora_expand_slices_triton`)."""
    num_slices, num_tokens, max_rank = h.shape
    sizes = _slice_sizes(out, slice_sizes, num_slices)
    num_segs = seg_slots.shape[0]
    if num_tokens == 0 or max(sizes) == 0 or num_segs == 0:
        return
    b_rows, ranks = _tables(b_rows, ranks)
    scales = scales.contiguous()
    g, stride_gn, stride_gs = _g_args(g_rows, ranks)
    h = h if h.stride(2) == 1 else h.contiguous()
    block_r = min(32, max(16, triton.next_power_of_2(max_rank)))
    block_seg, block_first, num_programs = block_map(seg_starts, num_tokens, block_m)
    grid = (num_programs, triton.cdiv(max(sizes), block_n), num_slices)
    _expand_segments_kernel[grid](
        h, pool_flat, b_rows, ranks, scales, seg_starts, seg_slots, block_seg, block_first, g,
        out, num_segs, *sizes, h.stride(0), h.stride(1), b_rows.stride(0), b_rows.stride(1),
        ranks.stride(0), stride_gn, stride_gs, out.stride(0), out.stride(1),
        HAS_G=g_rows is not None, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_N=block_n,
        VEC=_vec(pool_flat), PRECISION=_precision(pool_flat), num_warps=4)


def lora_expand_segments_triton(h: torch.Tensor, pool_flat: torch.Tensor, b_rows: torch.Tensor,
                                ranks: torch.Tensor, scales: torch.Tensor,
                                seg_starts: torch.Tensor, seg_slots: torch.Tensor,
                                out: torch.Tensor, g_rows: torch.Tensor | None = None) -> None:
    """Triton twin of `lora_expand_segments_ref`; optional DoRA g_rows [S] in the epilogue."""
    lora_expand_segments_slices_triton(h[None], pool_flat, b_rows[None], ranks[None],
                                       scales[None], seg_starts, seg_slots, out, None,
                                       None if g_rows is None else g_rows[None])
