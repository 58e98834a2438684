"""Triton twin of `dora_scale_ref`: each token's output row times its adapter's g row (from the pool).

The same scale is fused into the LoRA expand epilogue (`lora_triton`, `g_rows=`); this standalone
op serves callers that apply it separately. Imports triton; loaded only by `kernels.dispatch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dora_scale_kernel(out_ptr, pool_ptr, g_rows_ptr, slots_ptr, d_out, stride_ot, stride_oc,
                       BLOCK_N: tl.constexpr):
    """One token × BLOCK_N columns: out = (out.float() * g.float()).to(out.dtype)."""
    t, nb = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    g_row = tl.where(slot >= 0, tl.load(g_rows_ptr + tl.maximum(slot, 0)), -1)
    if g_row >= 0:
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = cols < d_out
        ptrs = out_ptr + t * stride_ot + cols * stride_oc
        g = tl.load(pool_ptr + g_row + cols, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * g
        tl.store(ptrs, o.to(out_ptr.dtype.element_ty), mask=mask)


def dora_scale_triton(out: torch.Tensor, pool_flat: torch.Tensor, g_rows: torch.Tensor,
                      token_slots: torch.Tensor, block_n: int = 1024) -> None:
    """Triton twin of `dora_scale_ref` (same semantics and signature; `out` in place)."""
    num_tokens, d_out = out.shape
    if num_tokens == 0 or d_out == 0:
        return
    block_n = min(block_n, triton.next_power_of_2(d_out))
    grid = (num_tokens, triton.cdiv(d_out, block_n))
    _dora_scale_kernel[grid](out, pool_flat, g_rows.contiguous(), token_slots, d_out,
                             out.stride(0), out.stride(1), BLOCK_N=block_n, num_warps=4)
