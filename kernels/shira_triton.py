"""Triton twin of `shira_gather_ref`: per token, `out += scale · S x` over its adapter's non-zeros.

Values and positions are read in place from the pool (rows of W = d_in + d_out elements). Two
launches: atomics add each non-zero's product into an fp32 scratch row per token (duplicated
positions add, as in SHiRA's dense S), then one pass adds the scratch into `out` and rounds once.
Imports triton; loaded only by `kernels.dispatch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TOKENS_PER_LAUNCH = 256  # bounds the fp32 scratch of a long prefill to 256 × d_out


@triton.jit
def _gather_kernel(x_ptr, pool_ptr, pool_i32_ptr, value_rows_ptr, index_rows_ptr, nnz_ptr,
                   scales_ptr, slots_ptr, acc_ptr, t0, d_in, d_out, width, stride_xt,
                   stride_vs, stride_is, BLOCK: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """Token t0 + program_id(0), every NUM_SPLITS-th chunk of BLOCK non-zeros from program_id(1)."""
    t, split = t0 + tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    safe = tl.maximum(slot, 0)
    nnz = tl.where(slot >= 0, tl.load(nnz_ptr + safe), 0)
    scale = tl.load(scales_ptr + safe)
    for k0 in range(split * BLOCK, nnz, NUM_SPLITS * BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        live = k < nnz
        row, col = k // width, k % width
        value_off = tl.load(value_rows_ptr + safe * stride_vs + row, mask=live, other=0)
        index_off = tl.load(index_rows_ptr + safe * stride_is + row, mask=live, other=0)
        v = tl.load(pool_ptr + value_off + col, mask=live, other=0.0).to(tl.float32)
        p = tl.load(pool_i32_ptr + index_off + col, mask=live, other=0)
        live = live & (p >= 0) & (p < d_in * d_out)  # a corrupt position never writes wild
        x = tl.load(x_ptr + t * stride_xt + p % d_in, mask=live, other=0.0).to(tl.float32)
        acc_ptrs = acc_ptr + tl.program_id(0) * d_out + p // d_in
        tl.atomic_add(acc_ptrs, v * x * scale, mask=live)


@triton.jit
def _add_kernel(out_ptr, acc_ptr, slots_ptr, t0, d_out, stride_ot, stride_oc,
                BLOCK_N: tl.constexpr):
    """out[t] = (out[t].float() + acc[t]).to(out.dtype) for tokens with a SHiRA slot."""
    t, nb = t0 + tl.program_id(0), tl.program_id(1)
    if tl.load(slots_ptr + t) >= 0:
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = cols < d_out
        acc = tl.load(acc_ptr + tl.program_id(0) * d_out + cols, mask=mask, other=0.0)
        ptrs = out_ptr + t * stride_ot + cols * stride_oc
        o = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) + acc
        tl.store(ptrs, o.to(out_ptr.dtype.element_ty), mask=mask)


def shira_gather_triton(x: torch.Tensor, pool_flat: torch.Tensor, pool_i32: torch.Tensor,
                        value_rows: torch.Tensor, index_rows: torch.Tensor, nnz: torch.Tensor,
                        scales: torch.Tensor, token_slots: torch.Tensor, out: torch.Tensor,
                        block: int = 512, num_splits: int = 16) -> None:
    """Triton twin of `shira_gather_ref` (same semantics and signature; `out` in place)."""
    num_tokens, d_in = x.shape
    d_out = out.shape[1]
    if num_tokens == 0 or d_out == 0:
        return
    x = x if x.stride(1) == 1 else x.contiguous()
    value_rows, index_rows = value_rows.contiguous(), index_rows.contiguous()
    nnz, scales = nnz.contiguous(), scales.contiguous()
    block_n = min(1024, triton.next_power_of_2(d_out))
    chunk = min(num_tokens, TOKENS_PER_LAUNCH)
    acc = torch.empty((chunk, d_out), dtype=torch.float32, device=x.device)
    for t0 in range(0, num_tokens, chunk):
        count = min(chunk, num_tokens - t0)
        acc.zero_()
        _gather_kernel[(count, num_splits)](
            x, pool_flat, pool_i32, value_rows, index_rows, nnz, scales, token_slots, acc, t0,
            d_in, d_out, d_in + d_out, x.stride(0), value_rows.stride(0), index_rows.stride(0),
            BLOCK=block, NUM_SPLITS=num_splits, num_warps=4)
        _add_kernel[(count, triton.cdiv(d_out, block_n))](
            out, acc, token_slots, t0, d_out, out.stride(0), out.stride(1), BLOCK_N=block_n,
            num_warps=4)
