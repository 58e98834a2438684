"""Paged attention and the K/V write, Triton twins against their torch references (the
references have loop oracles in `test_attention_kernels.py`); LoRA, DoRA and SHiRA are in
`test_triton_kernels.py`.

With CUDA the tests run here, at small and at Llama-3-8B shapes, in fp32, fp16 and bf16. Without
it they run under Triton's interpreter in a child pytest started with TRITON_INTERPRET=1 (why:
`triton_helpers.py`), so the Triton kernels are imported only when `RUN_HERE`. Outputs and unused
pages are poisoned (NaN) first.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from loraplex.kernels.attention import paged_attention_ref, write_kv_ref  # noqa: E402
from loraplex.kernels.tuning import launch  # noqa: E402
from tests.kernels.triton_helpers import (  # noqa: E402
    DEVICE,
    DTYPES,
    ON_CUDA,
    RUN_HERE,
    assert_close,
    drop_tests_not_run_here,
    exact_fp32_references,  # noqa: F401 (autouse fixture: no tf32 in fp32 references)
    gen_for,
    run_in_interpreter_child,
)

if RUN_HERE:
    from loraplex.kernels import attention_triton as attn_t  # noqa: E402


# ---- K/V write and paged attention ----------------------------------------------------------------

@dataclass(frozen=True)
class AttentionCase:
    name: str
    context_lens: tuple[int, ...]
    query_lens: tuple[int, ...]
    heads: tuple[int, int]  # (H_q, H_kv)
    head_dim: int
    page_size: int


ATTENTION_CASES = [
    AttentionCase("decode_gqa", (5, 17, 1, 33), (1, 1, 1, 1), (8, 2), 16, 16),
    AttentionCase("prefill_mha", (7, 16, 3), (7, 16, 3), (4, 4), 32, 16),
    AttentionCase("chunked_mqa", (20, 9), (6, 4), (4, 1), 16, 8),
    AttentionCase("mixed_gqa3", (40, 1, 13, 8, 5), (40, 1, 5, 1, 0), (6, 2), 24, 16),
    AttentionCase("long_prefill", (300,), (300,), (2, 1), 16, 16),
] + ([
    AttentionCase("llama3_decode", tuple(range(200, 200 + 64 * 31, 31)), (1,) * 64, (32, 8),
                  128, 16),
    AttentionCase("llama3_prefill", (1000, 300, 77, 2048), (1000, 300, 1, 513), (32, 8), 128,
                  16),
] if ON_CUDA else [])


def make_kv(case: AttentionCase, dtype: torch.dtype, gen: torch.Generator) -> dict:
    """All layers' K/V pages in one tensor (caches are strided views), pages out of order,
    unused pages NaN (a read past a context fails)."""
    num_q_heads, num_kv_heads = case.heads
    pages_per_seq = [-(-c // case.page_size) for c in case.context_lens]
    num_pages = sum(pages_per_seq) + 3
    pool = torch.full((num_pages, 2, 2, case.page_size, num_kv_heads, case.head_dim),
                      float("nan"), dtype=dtype)
    order = torch.randperm(num_pages, generator=gen).tolist()
    block_tables = torch.zeros((len(pages_per_seq), max(pages_per_seq)), dtype=torch.int32)
    for b, n in enumerate(pages_per_seq):
        block_tables[b, :n] = torch.tensor([order.pop() for _ in range(n)])
        for j in range(case.context_lens[b]):
            page, offset = int(block_tables[b, j // case.page_size]), j % case.page_size
            pool[page, 1, :, offset] = torch.randn(2, num_kv_heads, case.head_dim,
                                                   generator=gen).to(dtype)
    starts = torch.tensor([0, *torch.tensor(case.query_lens).cumsum(0).tolist()],
                          dtype=torch.int32)
    pool = pool.to(DEVICE)
    return dict(k_cache=pool[:, 1, 0], v_cache=pool[:, 1, 1],
                q=torch.randn(int(starts[-1]), num_q_heads, case.head_dim,
                              generator=gen).to(dtype).to(DEVICE),
                block_tables=block_tables.to(DEVICE),
                context_lens=torch.tensor(case.context_lens, dtype=torch.int32, device=DEVICE),
                query_start_loc=starts.to(DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c.name)
def test_paged_attention_matches_reference(case: AttentionCase, dtype: torch.dtype) -> None:
    gen = gen_for("attention", case.name, dtype)
    b = make_kv(case, dtype, gen)
    args = (b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["context_lens"],
            b["query_start_loc"], case.head_dim ** -0.5)
    want = paged_attention_ref(*args)
    out = torch.full_like(b["q"], float("nan"))
    attn_t.attention_into(out, *args)
    assert_close(out, want, dtype)
    assert_close(attn_t.paged_attention_triton(*args), want, dtype)


SPLIT_CASES = [
    # Decode (one program per sequence): contexts shorter than a share, a context of one key,
    # shares of several key blocks.
    AttentionCase("decode_split", (5, 2, 1, 150, 33, 7), (1,) * 6, (8, 2), 16, 16),
    # T == B with uneven queries (0, 2 or 9 per sequence): the per-sequence programs walk 0 to
    # 5 query blocks of 2 queries (8 heads per KV head).
    AttentionCase("per_sequence_uneven", (9, 30, 4, 2, 3, 1, 7, 5, 6, 8, 2),
                  (0, 9, 0, 2, 0, 0, 0, 0, 0, 0, 0), (8, 1), 16, 4),
    AttentionCase("prefill_split", (40, 13, 70), (40, 5, 1), (6, 2), 24, 16),
    # Pad sequences of a padded step only: no key, zeros (also no page at all).
    AttentionCase("pads_only", (0, 0, 0), (1, 1, 1), (4, 2), 16, 16),
] + ([AttentionCase("llama3_decode_split", tuple(range(1, 1 + 24 * 97, 97)), (1,) * 24,
                    (32, 8), 128, 16)] if ON_CUDA else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [None, 2, 5, 16])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: c.name)
def test_split_keys_match_reference(case: AttentionCase, splits: int | None,
                                    dtype: torch.dtype) -> None:
    """Keys split in shares (flash-decoding) and combined: the same attention, any share count
    (None: the launcher's choice), shares past the keys empty; small key blocks give shares."""
    gen = gen_for("attention-split", case.name, dtype)
    b = make_kv(case, dtype, gen)
    args = (b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["context_lens"],
            b["query_start_loc"], case.head_dim ** -0.5)
    want = paged_attention_ref(*args)
    out = torch.full_like(b["q"], float("nan"))
    attn_t.attention_into(out, *args, block_n=16, splits=splits)
    assert_close(out, want, dtype)


@pytest.mark.parametrize("num_seqs,kv_heads,capacity", [
    (1, 8, 8192), (3, 2, 8192), (64, 8, 1024), (1, 1, 100), (1, 1, 256), (1024, 8, 8192)])
def test_decode_splits_fill_the_grid_from_shapes_only(num_seqs: int, kv_heads: int,
                                                      capacity: int) -> None:
    """The fewest power-of-two splits (≤ 16) that give the tuned programs per SM, each spanning
    at least one key block (64) of the tables' capacity."""
    target = launch(DEVICE).attention_programs_per_sm * attn_t.num_sms(DEVICE)
    splits = attn_t.decode_splits(num_seqs, kv_heads, capacity, 64, DEVICE)
    assert splits in (1, 2, 4, 8, 16) and splits * 64 <= max(capacity, 64)
    programs = num_seqs * kv_heads
    full = programs * splits >= target or splits == 16 or 2 * splits * 64 > capacity
    assert full and (splits == 1 or programs * splits // 2 < target)


@pytest.mark.skipif(not ON_CUDA, reason="needs a 4 GiB pool")
def test_paged_attention_and_write_kv_past_2_31_elements() -> None:
    """Page offsets past 2³¹ elements (a real pool: 1 Mi-element pages) need 64-bit pointers."""
    page_stride, page_size, heads, dim = 2**30 + 512, 16, 2, 32
    buffer = torch.empty(2 * page_stride + page_size * heads * dim, dtype=torch.bfloat16,
                         device=DEVICE)
    cache = buffer.as_strided((3, page_size, heads, dim), (page_stride, heads * dim, dim, 1))
    cache.normal_()
    k = torch.randn(3, heads, dim, device=DEVICE).to(torch.bfloat16)
    slots = torch.tensor([2 * page_size + 5, 2 * page_size + 6, 7], device=DEVICE)
    attn_t.write_kv_triton(cache, cache, k, k, slots)
    assert torch.equal(cache[2, 5], k[0]) and torch.equal(cache[0, 7], k[2])
    q = torch.randn(2, 4, dim, device=DEVICE).to(torch.bfloat16)
    args = (q, cache, cache, torch.tensor([[2, 0], [0, 2]], dtype=torch.int32, device=DEVICE),
            torch.tensor([20, 9], dtype=torch.int32, device=DEVICE),
            torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE), dim ** -0.5)
    assert_close(attn_t.paged_attention_triton(*args), paged_attention_ref(*args),
                 torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,head_dim", [((2, 8)), ((3, 24))] + (
    [((8, 128))] if ON_CUDA else []))
def test_write_kv_matches_reference(dtype: torch.dtype, heads: int, head_dim: int) -> None:
    gen = gen_for("write_kv", dtype, heads)
    num_pages, page_size, num_tokens = 6, 4, 11
    pool = torch.randn(num_pages, 2, 2, page_size, heads, head_dim, generator=gen).to(dtype)
    pool = pool.to(DEVICE)
    want_pool = pool.clone()
    slots = torch.randperm(num_pages * page_size, generator=gen)[:num_tokens]
    slots[[2, 7]] = -1
    slots = slots.to(DEVICE)
    k = torch.randn(num_tokens, heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(num_tokens, heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    write_kv_ref(want_pool[:, 1, 0], want_pool[:, 1, 1], k, v, slots)
    attn_t.write_kv_triton(pool[:, 1, 0], pool[:, 1, 1], k, v, slots)
    assert torch.equal(pool, want_pool)


def test_interpreter_suite_in_child_process() -> None:
    """Without CUDA: this module's tests under TRITON_INTERPRET=1 in a fresh interpreter."""
    run_in_interpreter_child(__file__)


drop_tests_not_run_here(globals())
