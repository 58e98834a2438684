"""The base model's elementwise ops, each one launch on the Triton path: RMSNorm (alone and after
the residual add), RoPE on q and k together (alone, or with the layer's K/V write), and
SiLU-and-multiply.

Eagerly each is a chain of small torch ops (RMSNorm alone is eight launches), about 2 µs each even
replayed in a CUDA graph. Torch references plus the public entry points; imports only
`kernels.dispatch` and `kernels.attention` (the K/V write's reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraplex.kernels.attention import write_kv_ref
from loraplex.kernels.dispatch import (
    INDEX_DTYPES,
    check,
    check_same_device,
    check_tensor,
    pick,
)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Semantics:  xf = x.float()
                    out = weight * (xf * rsqrt(mean(xf², last dim) + eps)).to(x.dtype)
    (HF's LlamaRMSNorm: normalised in fp32, rounded to x.dtype, then scaled.)
    x: [T, C] or [T, H, C] (q_norm/k_norm: per head); weight: [C]
    → out: x's shape in promote_types(weight.dtype, x.dtype) (new).
    """
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics:  total = h + delta                     (rounded to h.dtype)
                    out = rms_norm_ref(total, weight, eps)
    The residual add before a layer's norm. h, delta: [T, C], one dtype; weight: [C]
    → (total: [T, C] in h.dtype, out: [T, C] as `rms_norm_ref`'s), both new.
    """
    total = h + delta
    return total, rms_norm_ref(total, weight, eps)


def rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics:  rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])
                    out(x)[t, h] = x[t, h] * cos[t] + rotate_half(x[t, h]) * sin[t]   (x.dtype)
    HF's apply_rotary_pos_emb. q: [T, H_q, D], k: [T, H_k, D] (strided views are fine), D even;
    cos, sin: [T, D] in q.dtype (the fp32 angles already rounded to it, halves repeated)
    → (q_out: [T, H_q, D], k_out: [T, H_k, D]) in q.dtype (new, contiguous).
    The Triton twin sums in fp32 and rounds once (torch rounds each product): ≤ 1 ulp off.
    """
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rope_write_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> torch.Tensor:
    """Semantics:  q_out, k_out = rope_ref(q, k, cos, sin)
                    write_kv_ref(k_cache, v_cache, k_out, v, slot_mapping)
                    return q_out
    A layer's RoPE and K/V write in one launch on the Triton path (the rotated k is only wanted
    in the cache). Shapes as `rope_ref` and `write_kv_ref`; v like k; caches in place.
    """
    q_out, k_out = rope_ref(q, k, cos, sin)
    write_kv_ref(k_cache, v_cache, k_out, v, slot_mapping)
    return q_out


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Semantics:  gate, up = gate_up[:, :d], gate_up[:, d:]
                    out = silu(gate) * up             (silu rounded to gate_up.dtype first)
    The gated MLP's activation. gate_up: [T, 2d] (row-strided is fine) → out: [T, d] (new).
    """
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _check_norm_weight(weight: torch.Tensor, x: torch.Tensor) -> None:
    check_tensor("weight", weight, 1, FLOAT_DTYPES)
    check(weight.shape[0] == x.shape[-1],
          lambda: f"weight [{weight.shape[0]}] vs x {tuple(x.shape)}")
    check_same_device(x=x, weight=weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Checked entry point of `rms_norm_ref` (same semantics)."""
    check(isinstance(x, torch.Tensor) and x.dim() in (2, 3),
          lambda: f"x: expected [T, C] or [T, H, C], got {getattr(x, 'shape', type(x).__name__)}")
    check(x.dtype in FLOAT_DTYPES, lambda: f"x: dtype {x.dtype} not in {FLOAT_DTYPES}")
    _check_norm_weight(weight, x)
    if x.numel() == 0:
        return rms_norm_ref(x, weight, eps)
    return pick(rms_norm_ref, x.device)(x, weight, eps)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked entry point of `add_rms_norm_ref` (same semantics)."""
    check_tensor("h", h, 2, FLOAT_DTYPES)
    check_tensor("delta", delta, 2, h.dtype)
    check(delta.shape == h.shape, lambda: f"delta {tuple(delta.shape)} vs h {tuple(h.shape)}")
    check_same_device(h=h, delta=delta)
    _check_norm_weight(weight, h)
    if h.numel() == 0:
        return add_rms_norm_ref(h, delta, weight, eps)
    return pick(add_rms_norm_ref, h.device)(h, delta, weight, eps)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked entry point of `rope_ref` (same semantics)."""
    _check_rope(q, k, cos, sin)
    if q.shape[0] == 0:
        return rope_ref(q, k, cos, sin)
    return pick(rope_ref, q.device)(q, k, cos, sin)


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> torch.Tensor:
    """Checked entry point of `rope_write_kv_ref` (same semantics; caches written in place)."""
    _check_rope(q, k, cos, sin)
    check_tensor("v", v, 3, q.dtype)
    check(v.shape == k.shape, lambda: f"v {tuple(v.shape)} vs k {tuple(k.shape)}")
    check_tensor("k_cache", k_cache, 4, q.dtype)
    check(v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype,
          "k_cache and v_cache differ in shape or dtype")
    check(k.shape[1:] == k_cache.shape[2:],
          lambda: f"k {tuple(k.shape)} vs cache {tuple(k_cache.shape)}")
    check_tensor("slot_mapping", slot_mapping, 1, INDEX_DTYPES)
    check(slot_mapping.shape[0] == q.shape[0], "slot_mapping and q disagree on tokens")
    check_same_device(q=q, v=v, k_cache=k_cache, slot_mapping=slot_mapping)
    if q.shape[0] == 0:
        return rope_write_kv_ref(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    return pick(rope_write_kv_ref, q.device)(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)


def _check_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    check_tensor("q", q, 3, FLOAT_DTYPES)
    check_tensor("k", k, 3, q.dtype)
    num_tokens, head_dim = q.shape[0], q.shape[2]
    check(k.shape[0] == num_tokens and k.shape[2] == head_dim,
          lambda: f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on tokens or head_dim")
    check(head_dim % 2 == 0, lambda: f"head_dim {head_dim} is odd")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, 2, q.dtype)
        check(tuple(t.shape) == (num_tokens, head_dim), lambda: f"{name} {tuple(t.shape)} vs q "
              f"{tuple(q.shape)}: expected [{num_tokens}, {head_dim}]")
    check_same_device(q=q, k=k, cos=cos, sin=sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Checked entry point of `silu_mul_ref` (same semantics)."""
    check_tensor("gate_up", gate_up, 2, FLOAT_DTYPES)
    check(gate_up.shape[1] % 2 == 0, lambda: f"gate_up {tuple(gate_up.shape)}: odd width")
    if gate_up.numel() == 0:
        return silu_mul_ref(gate_up)
    return pick(silu_mul_ref, gate_up.device)(gate_up)
