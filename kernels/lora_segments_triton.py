"""Triton twins of the prefill LoRA ops in `lora.py` (S-LoRA's SGMV): shrink/expand for segments
of tokens that share an adapter slot, several slices per launch, DoRA's g in the expand epilogue.

Imports triton; re-exported by `lora_triton` (where `kernels.dispatch` finds the twins).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from loraplex.kernels.lora_triton_common import (
    epilogue,
    g_row_args,
    load_rows,
    padded_slice_sizes,
    row_tables,
    slice_columns,
    slot_scalars,
    vec_width,
)


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


SEGMENT_BLOCK_M = 32
"""Tokens per program of both prefill kernels: one block map serves the shrink and the expand."""


class BlockMap(NamedTuple):
    """Which segment each prefill program works on, built on the device by `block_map`."""

    block_seg: torch.Tensor  # [P] int64 segment of each program (>= G: idle program)
    block_first: torch.Tensor  # [G] int64 first program of each segment
    num_programs: int  # P, the grid's first dimension
    block_m: int  # tokens per program it was built for


def block_map(seg_starts: torch.Tensor, num_tokens: int,
              block_m: int = SEGMENT_BLOCK_M) -> BlockMap:
    """The programs of a prefill launch: 8 small torch ops, so one map serves both stages.

    P = cdiv(T, BLOCK_M) + G bounds Σ cdiv(len_g, BLOCK_M) without reading lengths on the host
    (no sync); programs past the last segment exit at once.
    """
    # int32 starts stay int32 (no conversion launch); cumsum returns int64 for either dtype.
    lengths = (seg_starts[1:] - seg_starts[:-1]).clamp(min=0)
    num_blocks = (lengths + (block_m - 1)) // block_m
    block_end = torch.cumsum(num_blocks, 0)
    grid = triton.cdiv(num_tokens, block_m) + lengths.shape[0]
    programs = torch.arange(grid, device=seg_starts.device)
    return BlockMap(torch.searchsorted(block_end, programs, right=True),
                    block_end - num_blocks, grid, block_m)


def _map_for(segment_map: BlockMap | None, seg_starts: torch.Tensor, num_tokens: int,
             block_m: int) -> BlockMap:
    if segment_map is None:
        return block_map(seg_starts, num_tokens, block_m)
    assert segment_map.block_m == block_m, f"map for BLOCK_M {segment_map.block_m}, not {block_m}"
    return segment_map


def _precision(pool_flat: torch.Tensor) -> str:
    """fp32 pools: exact fp32 dots (the 1e-4 contract); 16-bit pools: tf32 for the fp32 h."""
    return "ieee" if pool_flat.dtype == torch.float32 else "tf32"


def shrink_segments_into(h: torch.Tensor, x: torch.Tensor, pool_flat: torch.Tensor,
                         a_rows: torch.Tensor, ranks: torch.Tensor, seg_starts: torch.Tensor,
                         seg_slots: torch.Tensor, block_m: int = SEGMENT_BLOCK_M,
                         block_k: int = 64, segment_map: BlockMap | None = None) -> None:
    """Prefill shrink of NS slices into h [NS, T, R]: writes every element of tokens inside a
    segment (zeros past the rank or for slot -1); tokens outside all segments are not touched.
    segment_map: `block_map(seg_starts, T, block_m)` when the caller has it already."""
    num_slices, num_tokens, max_rank = h.shape
    num_segs = seg_slots.shape[0]
    if num_tokens == 0 or max_rank == 0 or num_segs == 0:
        return
    a_rows, ranks = row_tables(a_rows, ranks)
    x = x if x.stride(1) == 1 else x.contiguous()
    block_r = min(64, max(16, triton.next_power_of_2(max_rank)))
    bmap = _map_for(segment_map, seg_starts, num_tokens, block_m)
    grid = (bmap.num_programs, triton.cdiv(max_rank, block_r), num_slices)
    _shrink_segments_kernel[grid](
        x, pool_flat, a_rows, ranks, seg_starts, seg_slots, bmap.block_seg, bmap.block_first, h,
        num_segs, x.shape[1], max_rank, x.stride(0), a_rows.stride(0), a_rows.stride(1),
        ranks.stride(0), h.stride(0), h.stride(1), BLOCK_M=block_m, BLOCK_R=block_r,
        BLOCK_K=block_k, VEC=vec_width(pool_flat), PRECISION=_precision(pool_flat), num_warps=4)


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
                                       g_rows: torch.Tensor | None = None,
                                       block_m: int = SEGMENT_BLOCK_M, block_n: int = 64,
                                       segment_map: BlockMap | None = None) -> None:
    """`lora_expand_segments_ref` for NS slices (shapes as `lora_expand_slices_triton`); reads
    h only at tokens of segments with slot >= 0 and ranks below their slot's rank.
    segment_map: `block_map(seg_starts, T, block_m)` when the caller has it already."""
    num_slices, num_tokens, max_rank = h.shape
    sizes = padded_slice_sizes(out, slice_sizes, num_slices)
    num_segs = seg_slots.shape[0]
    if num_tokens == 0 or max(sizes) == 0 or num_segs == 0:
        return
    b_rows, ranks = row_tables(b_rows, ranks)
    scales = scales.contiguous()
    g, stride_gn, stride_gs = g_row_args(g_rows, ranks)
    h = h if h.stride(2) == 1 else h.contiguous()
    block_r = min(32, max(16, triton.next_power_of_2(max_rank)))
    bmap = _map_for(segment_map, seg_starts, num_tokens, block_m)
    grid = (bmap.num_programs, triton.cdiv(max(sizes), block_n), num_slices)
    _expand_segments_kernel[grid](
        h, pool_flat, b_rows, ranks, scales, seg_starts, seg_slots, bmap.block_seg,
        bmap.block_first, g, out, num_segs, *sizes, h.stride(0), h.stride(1), b_rows.stride(0),
        b_rows.stride(1), ranks.stride(0), stride_gn, stride_gs, out.stride(0), out.stride(1),
        HAS_G=g_rows is not None, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_N=block_n,
        VEC=vec_width(pool_flat), PRECISION=_precision(pool_flat), num_warps=4)


def lora_expand_segments_triton(h: torch.Tensor, pool_flat: torch.Tensor, b_rows: torch.Tensor,
                                ranks: torch.Tensor, scales: torch.Tensor,
                                seg_starts: torch.Tensor, seg_slots: torch.Tensor,
                                out: torch.Tensor, g_rows: torch.Tensor | None = None) -> None:
    """Triton twin of `lora_expand_segments_ref`; optional DoRA g_rows [S] in the epilogue."""
    lora_expand_segments_slices_triton(h[None], pool_flat, b_rows[None], ranks[None],
                                       scales[None], seg_starts, seg_slots, out, None,
                                       None if g_rows is None else g_rows[None])
