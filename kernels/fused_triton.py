"""Triton twins of `kernels.fused`: RMSNorm (alone or after the residual add), RoPE on q and k
(alone or with the layer's K/V write), SiLU-and-multiply, each one launch.

Every twin computes in fp32 and rounds where its reference rounds (the normalised row and SiLU's
output to the input dtype before the multiply that follows, the residual sum to h's dtype), so
only the last rounding of a product can differ from torch's (by one ulp). Imports triton;
loaded only by `kernels.dispatch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE_ELEMENTS = 2048  # a norm program takes rows up to this many elements (q/k norm: 16 heads)
_SILU_BLOCK = 1024


def _num_warps(elements: int) -> int:
    return max(4, min(16, elements // 512))


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@triton.jit
def _norm_kernel(x_ptr, delta_ptr, total_ptr, w_ptr, out_ptr, num_rows, num_heads, num_cols,
                 stride_xt, stride_xh, stride_dt, eps, HAS_DELTA: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """BLOCK_R rows (row r: token r // num_heads, head r % num_heads) normalised over num_cols;
    with HAS_DELTA, x + delta first (rounded to x's dtype and stored to total)."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < num_cols
    mask = (rows < num_rows)[:, None] & col_mask[None, :]
    x_rows = rows // num_heads * stride_xt + rows % num_heads * stride_xh
    x = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=0.0)
    out_offsets = rows[:, None] * num_cols + cols[None, :]
    if HAS_DELTA:
        delta = tl.load(delta_ptr + rows[:, None] * stride_dt + cols[None, :], mask=mask,
                        other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(total_ptr + out_offsets, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=1) / num_cols + eps)  # [BLOCK_R]
    normed = (xf * inv_rms[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offsets, (w[None, :] * normed).to(out_ptr.dtype.element_ty),
             mask=mask)


def _launch_norm(x: torch.Tensor, delta: torch.Tensor | None, total: torch.Tensor | None,
                 weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    """x: [T, H, C]; delta: [T, C] or None (then H = 1); total, out: contiguous."""
    x = _unit_last_stride(x)
    delta = None if delta is None else _unit_last_stride(delta)
    num_tokens, num_heads, num_cols = x.shape
    if num_tokens * num_heads * num_cols == 0:
        return
    num_rows = num_tokens * num_heads
    block_c = triton.next_power_of_2(num_cols)
    block_r = min(max(1, _TILE_ELEMENTS // block_c), triton.next_power_of_2(num_rows))
    has_delta = delta is not None
    _norm_kernel[(triton.cdiv(num_rows, block_r),)](
        x, delta if has_delta else x, total if has_delta else out, weight.contiguous(), out,
        num_rows, num_heads, num_cols, x.stride(0), x.stride(1),
        delta.stride(0) if has_delta else 0, eps, HAS_DELTA=has_delta, BLOCK_R=block_r,
        BLOCK_C=block_c, num_warps=_num_warps(block_r * block_c))


def rms_norm_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """`rms_norm_ref(x, weight, eps)` written into `out` (contiguous, x's shape)."""
    _launch_norm(x[:, None, :] if x.dim() == 2 else x, None, None, weight, eps, out)


def add_rms_norm_into(total: torch.Tensor, out: torch.Tensor, h: torch.Tensor,
                      delta: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """`add_rms_norm_ref(h, delta, weight, eps)` written into `total` and `out` (contiguous)."""
    _launch_norm(h[:, None, :], delta, total, weight, eps, out)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton twin of `rms_norm_ref` (same semantics and signature)."""
    out = x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))
    rms_norm_into(out, x, weight, eps)
    return out


def add_rms_norm_triton(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `add_rms_norm_ref` (same semantics and signature)."""
    total = torch.empty_like(h, memory_format=torch.contiguous_format)
    out = h.new_empty(h.shape, dtype=torch.promote_types(weight.dtype, h.dtype))
    add_rms_norm_into(total, out, h, delta, weight, eps)
    return total, out


@triton.jit
def _rotate_heads(x_row, out_row, cos, sin, num_heads, head_dim, stride_xh, stride_oh,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One token's heads (x_row + h·stride_xh) rotated by cos, sin ([BLOCK_D] fp32) into
    out_row + h·stride_oh, rounded once to out's dtype."""
    heads, dims = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_D)
    half = head_dim // 2
    is_first = dims < half
    partner = tl.where(is_first, dims + half, dims - half)  # rotate_half's source column
    mask = (heads < num_heads)[:, None] & (dims < head_dim)[None, :]
    row = x_row + heads[:, None] * stride_xh
    x = tl.load(row + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(row + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    rotated = tl.where(is_first[None, :], -x_partner, x_partner)
    result = x * cos[None, :] + rotated * sin[None, :]
    tl.store(out_row + heads[:, None] * stride_oh + dims[None, :],
             result.to(out_row.dtype.element_ty), mask=mask)


@triton.jit
def _cos_sin(cos_ptr, sin_ptr, t, head_dim, stride_ct, stride_st, BLOCK_D: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    cos = tl.load(cos_ptr + t * stride_ct + dims, mask=dim_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_st + dims, mask=dim_mask, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, num_q_heads,
                 num_k_heads, head_dim, stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
                 stride_st, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """Program (t, 0) rotates token t's q heads, (t, 1) its k heads."""
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(cos_ptr, sin_ptr, t, head_dim, stride_ct, stride_st, BLOCK_D)
    if tl.program_id(1) == 0:
        _rotate_heads(q_ptr + t * stride_qt, q_out_ptr + t * num_q_heads * head_dim, cos, sin,
                      num_q_heads, head_dim, stride_qh, head_dim, BLOCK_HQ, BLOCK_D)
    else:
        _rotate_heads(k_ptr + t * stride_kt, k_out_ptr + t * num_k_heads * head_dim, cos, sin,
                      num_k_heads, head_dim, stride_kh, head_dim, BLOCK_HK, BLOCK_D)


@triton.jit
def _rope_write_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr,
                          v_cache_ptr, slots_ptr, num_q_heads, num_k_heads, head_dim, page_size,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_ct, stride_st, stride_c0, stride_c1, stride_c2,
                          BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """Program (t, 0) rotates token t's q heads into q_out; (t, 1) its k heads and (t, 2) its
    v heads go to page slot // page_size, offset slot % page_size of the caches (slot -1: no
    write)."""
    t, part = tl.program_id(0).to(tl.int64), tl.program_id(1)
    if part == 0:
        cos, sin = _cos_sin(cos_ptr, sin_ptr, t, head_dim, stride_ct, stride_st, BLOCK_D)
        _rotate_heads(q_ptr + t * stride_qt, q_out_ptr + t * num_q_heads * head_dim, cos, sin,
                      num_q_heads, head_dim, stride_qh, head_dim, BLOCK_HQ, BLOCK_D)
    else:
        slot = tl.load(slots_ptr + t).to(tl.int64)  # page · stride passes 2³¹ in a real pool
        if slot >= 0:
            dst = slot // page_size * stride_c0 + slot % page_size * stride_c1
            if part == 1:
                cos, sin = _cos_sin(cos_ptr, sin_ptr, t, head_dim, stride_ct, stride_st, BLOCK_D)
                _rotate_heads(k_ptr + t * stride_kt, k_cache_ptr + dst, cos, sin, num_k_heads,
                              head_dim, stride_kh, stride_c2, BLOCK_HK, BLOCK_D)
            else:
                heads, dims = tl.arange(0, BLOCK_HK), tl.arange(0, BLOCK_D)
                mask = (heads < num_k_heads)[:, None] & (dims < head_dim)[None, :]
                v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + dims[None, :],
                            mask=mask)
                tl.store(v_cache_ptr + dst + heads[:, None] * stride_c2 + dims[None, :],
                         v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rope_into(q_out: torch.Tensor, k_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
              cos: torch.Tensor, sin: torch.Tensor) -> None:
    """`rope_ref(q, k, cos, sin)` written into q_out and k_out (contiguous)."""
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    cos, sin = _unit_last_stride(cos), _unit_last_stride(sin)
    block_hq, block_hk = triton.next_power_of_2(num_q_heads), triton.next_power_of_2(k.shape[1])
    block_d = triton.next_power_of_2(head_dim)
    _rope_kernel[(num_tokens, 2)](
        q, k, cos, sin, q_out, k_out, num_q_heads, k.shape[1], head_dim, q.stride(0),
        q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d,
        num_warps=_num_warps(block_hq * block_d))


def rope_write_kv_into(q_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """`rope_write_kv_ref`'s q written into q_out (contiguous), its K/V into the caches."""
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    assert k_cache.stride() == v_cache.stride(), "k_cache and v_cache views must share strides"
    assert k_cache.stride(3) == 1, f"cache strides {k_cache.stride()}: head_dim must be 1"
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    cos, sin = _unit_last_stride(cos), _unit_last_stride(sin)
    block_hq, block_hk = triton.next_power_of_2(num_q_heads), triton.next_power_of_2(k.shape[1])
    block_d = triton.next_power_of_2(head_dim)
    _rope_write_kv_kernel[(num_tokens, 3)](
        q, k, v, cos, sin, q_out, k_cache, v_cache, slot_mapping, num_q_heads, k.shape[1],
        head_dim, k_cache.shape[1], q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), cos.stride(0), sin.stride(0), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        BLOCK_D=block_d, num_warps=_num_warps(block_hq * block_d))


def rope_write_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> torch.Tensor:
    """Triton twin of `rope_write_kv_ref` (same semantics and signature)."""
    q_out = torch.empty_like(q, memory_format=torch.contiguous_format)
    rope_write_kv_into(q_out, q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    return q_out


def rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `rope_ref` (same semantics and signature)."""
    q_out = torch.empty_like(q, memory_format=torch.contiguous_format)
    k_out = torch.empty_like(k, memory_format=torch.contiguous_format)
    rope_into(q_out, k_out, q, k, cos, sin)
    return q_out, k_out


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, d, stride_t, BLOCK: tl.constexpr):
    """Columns [j·BLOCK, (j+1)·BLOCK) of token t's silu(gate) * up."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    row = gate_up_ptr + t * stride_t
    gate = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + d + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + t * d + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_into(out: torch.Tensor, gate_up: torch.Tensor) -> None:
    """`silu_mul_ref(gate_up)` written into `out` (contiguous [T, d])."""
    num_tokens, d = out.shape
    if num_tokens * d == 0:
        return
    gate_up = _unit_last_stride(gate_up)
    block = min(_SILU_BLOCK, triton.next_power_of_2(d))
    _silu_mul_kernel[(num_tokens, triton.cdiv(d, block))](gate_up, out, d, gate_up.stride(0),
                                                           BLOCK=block, num_warps=4)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton twin of `silu_mul_ref` (same semantics and signature)."""
    out = gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))
    silu_mul_into(out, gate_up)
    return out
