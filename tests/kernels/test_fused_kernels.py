"""RMSNorm (alone and after the residual add), RoPE and SiLU-and-multiply: each torch reference
against transformers' own modules, and each Triton twin against its reference.

The references' oracles (`TestReferencesAgainstTransformers`, a class, so that
`drop_tests_not_run_here` keeps it) run in this process. The twins' tests follow
`triton_helpers.py`: with CUDA here (bf16 and Llama-3-8B shapes too), without it under Triton's
interpreter in a child pytest. Inputs are strided views into NaN-padded buffers (a read outside
them shows), outputs are poisoned (NaN) first.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.llama import modeling_llama as hf_llama

pytest.importorskip("triton")

from loraplex.kernels import fused  # noqa: E402
from loraplex.kernels.dispatch import KernelArgumentError, triton_twin  # noqa: E402
from tests.kernels.triton_helpers import (  # noqa: E402
    DEVICE,
    DTYPES,
    ON_CUDA,
    RUN_HERE,
    drop_tests_not_run_here,
    gen_for,
    rel_err,
    run_in_interpreter_child,
)

if RUN_HERE:
    from loraplex.kernels import fused_triton as fused_t  # noqa: E402

EPS = 1e-5
# fp32: the twins reorder sums and use the hardware rsqrt/exp (a few ulp); fp16/bf16: one ulp of
# the final rounding on some elements (RoPE rounds once where torch rounds three times).
REL_TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
CPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

NUM_TOKENS = [0, 1, 5, 33] + ([64, 300] if ON_CUDA else [])
NORM_SHAPES = [(None, 72), (None, 96), (4, 24), (3, 64)] + ([(None, 4096), (32, 128)]
                                                            if ON_CUDA else [])  # (H, C)
ROPE_HEADS = [(4, 2, 24), (3, 3, 64), (6, 1, 24)] + ([(32, 8, 128)] if ON_CUDA else [])
SILU_WIDTHS = [72, 96, 1100] + ([14336] if ON_CUDA else [])


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
    err = rel_err(got, want) if want.numel() else 0.0
    assert err <= REL_TOL[dtype], f"relative error {err:.3g} > {REL_TOL[dtype]} ({dtype})"


def assert_rounds_like(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp16/bf16 rounded in the reference's order: at most a few elements one ulp off (rounding
    the normalised row or SiLU's output one step later changes far more). fp32: no check."""
    if want.dtype == torch.float32 or want.numel() == 0:
        return
    same = (got == want).float().mean().item()
    assert same >= 0.98, f"only {same:.1%} of elements bit-identical"


def randn(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator,
          scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(shape, generator=gen)).to(dtype).to(DEVICE)


def padded_view(num_tokens: int, width: int, dtype: torch.dtype,
                gen: torch.Generator) -> torch.Tensor:
    """[T, width] random, a column slice of a NaN-padded buffer (row stride width + 9)."""
    buffer = torch.full((num_tokens, width + 9), float("nan"), dtype=dtype, device=DEVICE)
    buffer[:, 4:4 + width] = randn((num_tokens, width), dtype, gen, scale=2.0)
    return buffer[:, 4:4 + width]


def norm_weight(cols: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return (1.0 + 0.3 * torch.randn(cols, generator=gen)).to(dtype).to(DEVICE)


def rope_cos_sin(positions: torch.Tensor, head_dim: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, D] cos, sin as `LlamaModel.forward` builds them: fp32 angles, rounded to dtype."""
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype).to(DEVICE), emb.sin().to(dtype).to(DEVICE)


def qk_views(num_tokens: int, heads: tuple[int, int, int], dtype: torch.dtype,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H_q, D] and k [T, H_k, D]: column slices of one q|k|v row, v and padding NaN."""
    num_q, num_k, head_dim = heads
    qk = padded_view(num_tokens, (num_q + 2 * num_k) * head_dim, dtype, gen)
    qk[:, (num_q + num_k) * head_dim:] = float("nan")
    return (qk[:, :num_q * head_dim].view(num_tokens, num_q, head_dim),
            qk[:, num_q * head_dim:(num_q + num_k) * head_dim].view(num_tokens, num_k, head_dim))


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full(t.shape, float("nan"), dtype=t.dtype, device=t.device)


# ---- the references against transformers -------------------------------------------------------

class TestReferencesAgainstTransformers:
    """Each reference equals transformers' module bit for bit (the same torch ops, in order);
    the public entry points refuse bad arguments."""

    @pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
    @pytest.mark.parametrize("shape", [(5, 72), (5, 4, 24), (0, 96)], ids=str)
    def test_rms_norm(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        gen = gen_for("rms_norm_hf", shape, dtype)
        hf_norm = hf_llama.LlamaRMSNorm(shape[-1], eps=EPS)
        with torch.no_grad():
            hf_norm.weight.copy_(1.0 + 0.3 * torch.randn(shape[-1], generator=gen))
        hf_norm = hf_norm.to(dtype)
        x = (2.0 * torch.randn(shape, generator=gen)).to(dtype)
        with torch.no_grad():
            want = hf_norm(x)
            got = fused.rms_norm_ref(x, hf_norm.weight, EPS)
        assert torch.equal(got, want)

    @pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
    def test_add_rms_norm(self, dtype: torch.dtype) -> None:
        gen = gen_for("add_rms_norm_hf", dtype)
        hf_norm = hf_llama.LlamaRMSNorm(96, eps=EPS)
        with torch.no_grad():
            hf_norm.weight.copy_(1.0 + 0.3 * torch.randn(96, generator=gen))
        hf_norm = hf_norm.to(dtype)
        h = torch.randn(7, 96, generator=gen).to(dtype)
        delta = torch.randn(7, 96, generator=gen).to(dtype)
        with torch.no_grad():
            total, normed = fused.add_rms_norm_ref(h, delta, hf_norm.weight, EPS)
            assert torch.equal(total, h + delta) and torch.equal(normed, hf_norm(h + delta))

    @pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
    @pytest.mark.parametrize("heads", [(4, 2, 24), (2, 1, 64)], ids=str)
    def test_rope(self, heads: tuple[int, int, int], dtype: torch.dtype) -> None:
        num_q, num_k, head_dim = heads
        gen = gen_for("rope_hf", heads, dtype)
        config = LlamaConfig(hidden_size=num_q * head_dim, head_dim=head_dim,
                             num_attention_heads=num_q, num_key_value_heads=num_k,
                             rope_theta=10000.0, max_position_embeddings=8192)
        positions = torch.randint(0, 5000, (1, 9), generator=gen)
        q = torch.randn(9, num_q, head_dim, generator=gen).to(dtype)
        k = torch.randn(9, num_k, head_dim, generator=gen).to(dtype)
        cos, sin = hf_llama.LlamaRotaryEmbedding(config)(q, positions)  # [1, 9, D] in dtype
        want_q, want_k = hf_llama.apply_rotary_pos_emb(q.transpose(0, 1)[None],
                                                       k.transpose(0, 1)[None], cos, sin)
        got_q, got_k = fused.rope_ref(q, k, cos[0], sin[0])
        assert torch.equal(got_q, want_q[0].transpose(0, 1))
        assert torch.equal(got_k, want_k[0].transpose(0, 1))
        # The twins' tests build cos and sin as the forward does: as transformers does.
        our_cos, our_sin = rope_cos_sin(positions[0], head_dim, dtype)
        assert torch.equal(our_cos.cpu(), cos[0]) and torch.equal(our_sin.cpu(), sin[0])

    @pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
    def test_silu_mul(self, dtype: torch.dtype) -> None:
        gen = gen_for("silu_hf", dtype)
        gate_up = (4.0 * torch.randn(6, 2 * 72, generator=gen)).to(dtype)
        want = ACT2FN["silu"](gate_up[:, :72]) * gate_up[:, 72:]
        assert torch.equal(fused.silu_mul_ref(gate_up), want)

    def test_entry_points_refuse_bad_arguments(self) -> None:
        x, w = torch.randn(3, 8), torch.ones(8)
        cos = torch.ones(3, 8)
        bad_calls = [
            lambda: fused.rms_norm(x[0], w, EPS),
            lambda: fused.rms_norm(x, torch.ones(7), EPS),
            lambda: fused.add_rms_norm(x, x.half(), w, EPS),
            lambda: fused.rope(x.view(3, 1, 8), torch.randn(3, 1, 6), cos, cos),
            lambda: fused.rope(x.view(3, 2, 4), x.view(3, 2, 4), cos, cos),
            lambda: fused.rope(torch.randn(3, 1, 7), torch.randn(3, 1, 7), cos[:, :7],
                               cos[:, :7]),
            lambda: fused.silu_mul(torch.randn(3, 7)),
        ]
        for call in bad_calls:
            with pytest.raises(KernelArgumentError):
                call()


# ---- the Triton twins against the references ----------------------------------------------------

def test_each_reference_finds_its_twin() -> None:
    for name in ("rms_norm", "add_rms_norm", "rope", "rope_write_kv", "silu_mul"):
        assert triton_twin(getattr(fused, f"{name}_ref")) is getattr(fused_t, f"{name}_triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rms_norm_matches_reference(num_tokens: int, shape: tuple[int | None, int],
                                    dtype: torch.dtype) -> None:
    num_heads, cols = shape
    gen = gen_for("rms_norm", num_tokens, shape, dtype)
    x = padded_view(num_tokens, (num_heads or 1) * cols, dtype, gen)
    x = x if num_heads is None else x.view(num_tokens, num_heads, cols)
    weight = norm_weight(cols, dtype, gen)
    want = fused.rms_norm_ref(x, weight, EPS)
    out = nan_like(want)
    fused_t.rms_norm_into(out, x, weight, EPS)
    assert_close(out, want, dtype)
    assert_rounds_like(out, want)
    assert_close(fused_t.rms_norm_triton(x, weight, EPS), want, dtype)


@pytest.mark.parametrize("num_tokens", [0, 5])
def test_rms_norm_promotes_to_an_fp32_weight(num_tokens: int) -> None:
    gen = gen_for("rms_norm_fp32_weight", num_tokens)
    x = padded_view(num_tokens, 96, torch.float16, gen)
    weight = norm_weight(96, torch.float32, gen)
    want = fused.rms_norm_ref(x, weight, EPS)
    assert want.dtype == torch.float32
    assert_close(fused_t.rms_norm_triton(x, weight, EPS), want, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", [72, 96] + ([4096] if ON_CUDA else []))
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_add_rms_norm_matches_reference(num_tokens: int, cols: int, dtype: torch.dtype) -> None:
    gen = gen_for("add_rms_norm", num_tokens, cols, dtype)
    h, delta = padded_view(num_tokens, cols, dtype, gen), padded_view(num_tokens, cols, dtype,
                                                                      gen)
    weight = norm_weight(cols, dtype, gen)
    want_total, want = fused.add_rms_norm_ref(h, delta, weight, EPS)
    total, out = nan_like(want_total), nan_like(want)
    fused_t.add_rms_norm_into(total, out, h, delta, weight, EPS)
    assert torch.equal(total, want_total)  # the sum rounds to h's dtype once, as torch's add
    assert_close(out, want, dtype)
    assert_rounds_like(out, want)
    got_total, got = fused_t.add_rms_norm_triton(h, delta, weight, EPS)
    assert torch.equal(got_total, want_total)
    assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", ROPE_HEADS, ids=str)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rope_matches_reference(num_tokens: int, heads: tuple[int, int, int],
                                dtype: torch.dtype) -> None:
    gen = gen_for("rope", num_tokens, heads, dtype)
    q, k = qk_views(num_tokens, heads, dtype, gen)
    cos, sin = rope_cos_sin(torch.randint(0, 5000, (num_tokens,), generator=gen), heads[2],
                            dtype)
    want_q, want_k = fused.rope_ref(q, k, cos, sin)
    q_out, k_out = nan_like(want_q), nan_like(want_k)
    fused_t.rope_into(q_out, k_out, q, k, cos, sin)
    assert_close(q_out, want_q, dtype)
    assert_close(k_out, want_k, dtype)
    got_q, got_k = fused_t.rope_triton(q, k, cos, sin)
    assert_close(got_q, want_q, dtype)
    assert_close(got_k, want_k, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", ROPE_HEADS, ids=str)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rope_write_kv_matches_reference(num_tokens: int, heads: tuple[int, int, int],
                                         dtype: torch.dtype) -> None:
    """q rotated; k rotated and v written to their slots of strided cache views (pages out of
    order, slot -1: not written); every other cache element stays NaN."""
    num_q, num_k, head_dim = heads
    gen = gen_for("rope_write_kv", num_tokens, heads, dtype)
    q, k = qk_views(num_tokens, heads, dtype, gen)
    v = padded_view(num_tokens, num_k * head_dim, dtype, gen).view(num_tokens, num_k, head_dim)
    cos, sin = rope_cos_sin(torch.randint(0, 5000, (num_tokens,), generator=gen), head_dim,
                            dtype)
    page_size, num_pages = 4, num_tokens // 4 + 3
    pool = torch.full((num_pages, 2, 2, page_size, num_k, head_dim), float("nan"), dtype=dtype,
                      device=DEVICE)  # layer 1 of 2: strided views, as the engine's caches
    slots = torch.randperm(num_pages * page_size, generator=gen)[:num_tokens]
    slots[::3] = -1
    slots = slots.to(DEVICE)
    want_pool = pool.clone()
    want_q = fused.rope_write_kv_ref(q, k, v, cos, sin, want_pool[:, 1, 0], want_pool[:, 1, 1],
                                     slots)
    q_out = nan_like(want_q)
    fused_t.rope_write_kv_into(q_out, q, k, v, cos, sin, pool[:, 1, 0], pool[:, 1, 1], slots)
    assert_close(q_out, want_q, dtype)
    assert torch.equal(pool.isnan(), want_pool.isnan())  # nothing else written
    written = ~want_pool.isnan()
    assert_close(pool[written], want_pool[written], dtype)
    assert torch.equal(pool[:, 1, 1][~pool[:, 1, 1].isnan()],
                       want_pool[:, 1, 1][~want_pool[:, 1, 1].isnan()])  # v copied exactly
    got_pool = torch.full_like(pool, float("nan"))
    assert_close(fused_t.rope_write_kv_triton(q, k, v, cos, sin, got_pool[:, 1, 0],
                                              got_pool[:, 1, 1], slots), want_q, dtype)
    assert torch.equal(got_pool.isnan(), want_pool.isnan())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", SILU_WIDTHS)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_silu_mul_matches_reference(num_tokens: int, d: int, dtype: torch.dtype) -> None:
    gen = gen_for("silu_mul", num_tokens, d, dtype)
    gate_up = padded_view(num_tokens, 2 * d, dtype, gen)
    want = fused.silu_mul_ref(gate_up)
    out = nan_like(want)
    fused_t.silu_mul_into(out, gate_up)
    assert_close(out, want, dtype)
    assert_rounds_like(out, want)
    assert_close(fused_t.silu_mul_triton(gate_up), want, dtype)


def test_interpreter_suite_in_child_process() -> None:
    """Without CUDA: this module's tests under TRITON_INTERPRET=1 in a fresh interpreter."""
    run_in_interpreter_child(__file__)


drop_tests_not_run_here(globals())
