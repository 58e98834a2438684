"""Benchmarks of the fused elementwise kernels (`kernels/fused.py`): RMSNorm, residual add +
RMSNorm, RoPE on q and k (alone and with the K/V write), SiLU-and-multiply, each its Triton twin
against its torch reference (a chain of small launches), inside CUDA graphs (16 calls per
replay), next to the bytes it must move over the copy bandwidth. Run as part of `bench_kernels` (`--skip fused` leaves it
out).
"""

from __future__ import annotations

import torch

from loraplex.kernels import dispatch
from loraplex.kernels.fused import (
    add_rms_norm_ref,
    rms_norm_ref,
    rope_ref,
    rope_write_kv_ref,
    silu_mul_ref,
)
from loraplex.loadtest.bench_kernels import Dims, graph_time


CALLS_PER_REPLAY = 16


def per_call(fn, args: tuple, device: torch.device) -> float:
    """ms of one call inside a graph of CALLS_PER_REPLAY calls, as in a step's graph (a graph of
    one small kernel would time mostly the graph's own launch, several µs)."""
    def calls() -> None:
        for _ in range(CALLS_PER_REPLAY):
            fn(*args)
    return graph_time(calls, device) / CALLS_PER_REPLAY


def bench_fused(dims: Dims, dtype: torch.dtype, device: torch.device, bandwidth: float,
                with_ref: bool, token_counts: tuple[int, ...] = (64, 256, 2048)) -> list[dict]:
    rows = []
    elem = torch.tensor([], dtype=dtype).element_size()
    hidden, q_size = dims.hidden, dims.num_heads * dims.head_dim
    kv_size = dims.num_kv_heads * dims.head_dim
    for tokens in token_counts:
        h = torch.randn(tokens, hidden, device=device).to(dtype)
        delta = torch.randn_like(h)
        weight = torch.rand(hidden, device=device).to(dtype) + 0.5
        q = torch.randn(tokens, dims.num_heads, dims.head_dim, device=device).to(dtype)
        k = torch.randn(tokens, dims.num_kv_heads, dims.head_dim, device=device).to(dtype)
        angle = torch.rand(tokens, dims.head_dim // 2, device=device) * 100
        cos = torch.cat((angle.cos(), angle.cos()), -1).to(dtype)
        sin = torch.cat((angle.sin(), angle.sin()), -1).to(dtype)
        gate_up = torch.randn(tokens, 2 * dims.intermediate, device=device).to(dtype)
        v = torch.randn_like(k)
        page_size = 16
        cache = torch.zeros(-(-tokens // page_size), 2, page_size, dims.num_kv_heads,
                            dims.head_dim, device=device, dtype=dtype)
        slots = torch.randperm(cache.shape[0] * page_size, device=device)[:tokens]
        cases = (
            ("rms_norm", rms_norm_ref, (h, weight, 1e-5), 2 * h.numel()),
            ("add_rms_norm", add_rms_norm_ref, (h, delta, weight, 1e-5), 4 * h.numel()),
            ("rope", rope_ref, (q, k, cos, sin), 2 * tokens * (q_size + kv_size + dims.head_dim)),
            ("rope_write_kv", rope_write_kv_ref,
             (q, k, v, cos, sin, cache[:, 0], cache[:, 1], slots),
             2 * tokens * (q_size + 2 * kv_size + dims.head_dim)),
            ("silu_mul", silu_mul_ref, (gate_up,), gate_up.numel() * 3 // 2),
        )
        for name, ref, args, numel in cases:
            twin = dispatch.pick(ref, device)
            ms = per_call(twin, args, device)
            ref_ms = per_call(ref, args, device) if with_ref else float("nan")
            rows.append(dict(kernel=name, module=f"hidden{hidden}", batch=tokens, adapters=0,
                             ms=float("nan"), graph_ms=ms, ref_ms=ref_ms,
                             of_copy_bw=numel * elem / (ms * 1e-3) / bandwidth))
    return rows
