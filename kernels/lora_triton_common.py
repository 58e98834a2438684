"""Triton building blocks shared by the decode (`lora_triton`) and prefill
(`lora_segments_triton`) LoRA kernels: row loads from the pool, per-slot scalars, slice columns,
the expand epilogue (DoRA's g), and the launchers' table helpers. Imports triton.
"""

from __future__ import annotations

import functools

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


def vec_width(pool_flat: torch.Tensor) -> int:
    return max(1, 16 // pool_flat.element_size())


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (4 off CUDA); asked once per device, not per call."""
    if device.type != "cuda":
        return 4
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def row_tables(rows: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row tables with a slice axis [NS, S, R] (last dim contiguous) and ranks [NS, S]."""
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if ranks.stride(-1) != 1:
        ranks = ranks.contiguous()
    return rows, ranks


def padded_slice_sizes(out: torch.Tensor, slice_sizes: tuple[int, ...] | None, num_slices: int):
    sizes = tuple(slice_sizes) if slice_sizes is not None else (out.shape[1],)
    assert len(sizes) == num_slices <= MAX_SLICES, f"{num_slices} slices, sizes {sizes}"
    assert sum(sizes) <= out.shape[1], f"slices {sizes} wider than out {tuple(out.shape)}"
    return sizes + (0,) * (MAX_SLICES - len(sizes))


def g_row_args(g_rows: torch.Tensor | None, like: torch.Tensor):
    if g_rows is None:
        return like, 0, 0
    g_rows = g_rows.reshape(-1, g_rows.shape[-1])
    return g_rows, g_rows.stride(0), g_rows.stride(1)
