"""Paged attention and the K/V write against naive per-sequence loops and SDPA on copies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraplex.kernels import KernelArgumentError, paged_attention, write_kv

HEAD_DIM, NUM_LAYERS, LAYER = 16, 3, 1
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}
# (context lengths, query counts): the last n_b positions of each context are queried.
CASES = {
    "decode": ([5, 17, 1, 33], [1, 1, 1, 1]),
    "prefill": ([7, 16, 3], [7, 16, 3]),
    "chunked_prefill": ([20, 9], [6, 4]),
    "mixed": ([40, 1, 13, 8, 5], [40, 1, 5, 1, 0]),
}
HEADS = [(4, 4), (6, 2), (4, 1)]  # (H_q, H_kv): MHA, GQA, MQA


def make_batch(case: str, heads: tuple[int, int], page_size: int, dtype: torch.dtype,
               gen: torch.Generator) -> dict:
    """A pool of all layers' K/V pages with each sequence's pages shuffled, caches as views."""
    ctx_lens, q_lens = CASES[case]
    num_q_heads, num_kv_heads = heads
    pages_per_seq = [-(-c // page_size) for c in ctx_lens]
    num_pages = sum(pages_per_seq) + 3
    pool = torch.randn(num_pages, NUM_LAYERS, 2, page_size, num_kv_heads, HEAD_DIM,
                       generator=gen).to(dtype)
    order = torch.randperm(num_pages, generator=gen).tolist()
    block_tables = torch.full((len(ctx_lens), max(pages_per_seq)), 0, dtype=torch.int32)
    for b, n in enumerate(pages_per_seq):
        block_tables[b, :n] = torch.tensor([order.pop() for _ in range(n)])
    starts = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    return dict(
        pool=pool, k_cache=pool[:, LAYER, 0], v_cache=pool[:, LAYER, 1],
        q=torch.randn(int(starts[-1]), num_q_heads, HEAD_DIM, generator=gen).to(dtype),
        block_tables=block_tables, context_lens=torch.tensor(ctx_lens, dtype=torch.int32),
        query_start_loc=starts, ctx_lens=ctx_lens, q_lens=q_lens, page_size=page_size,
    )


def context(cache: torch.Tensor, batch: dict, b: int) -> torch.Tensor:
    """[ctx_b, H_kv, D] fp32 contiguous copy of sequence b's K or V, one position at a time."""
    ps = batch["page_size"]
    return torch.stack([cache[int(batch["block_tables"][b, j // ps]), j % ps].float()
                        for j in range(batch["ctx_lens"][b])])


def naive_attention(batch: dict) -> torch.Tensor:
    """Loops over sequences, queries and heads in fp32."""
    q = batch["q"].float()
    out = torch.zeros_like(q)
    group = q.shape[1] // batch["k_cache"].shape[2]
    for b, (ctx, n) in enumerate(zip(batch["ctx_lens"], batch["q_lens"])):
        keys, values = context(batch["k_cache"], batch, b), context(batch["v_cache"], batch, b)
        for i in range(n):
            t, p = int(batch["query_start_loc"][b]) + i, ctx - n + i
            for h in range(q.shape[1]):
                scores = keys[:p + 1, h // group] @ q[t, h] * HEAD_DIM ** -0.5
                out[t, h] = torch.softmax(scores, 0) @ values[:p + 1, h // group]
    return out


def sdpa_attention(batch: dict) -> torch.Tensor:
    """torch SDPA per sequence on contiguous copies of its context, bottom-right causal mask."""
    q = batch["q"].float()
    group = q.shape[1] // batch["k_cache"].shape[2]
    outs = []
    for b, (ctx, n) in enumerate(zip(batch["ctx_lens"], batch["q_lens"])):
        start = int(batch["query_start_loc"][b])
        keys = context(batch["k_cache"], batch, b).repeat_interleave(group, 1).transpose(0, 1)
        values = context(batch["v_cache"], batch, b).repeat_interleave(group, 1).transpose(0, 1)
        mask = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]  # [n, ctx]
        o = F.scaled_dot_product_attention(q[start:start + n].transpose(0, 1), keys, values,
                                           attn_mask=mask)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("page_size", [4, 16])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("case", list(CASES))
def test_paged_attention_matches_loops_and_sdpa(case: str, heads: tuple[int, int],
                                                page_size: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(list(CASES).index(case) * 100 + heads[0] * 10 + page_size)
    batch = make_batch(case, heads, page_size, dtype, gen)
    out = paged_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
                          batch["context_lens"], batch["query_start_loc"], HEAD_DIM ** -0.5)
    assert out.dtype == dtype and out.shape == batch["q"].shape
    torch.testing.assert_close(out.float(), naive_attention(batch), **TOL[dtype])
    torch.testing.assert_close(out.float(), sdpa_attention(batch), **TOL[dtype])


@pytest.mark.parametrize("page_size", [4, 16])
def test_unused_table_entries_and_cache_positions_are_ignored(page_size: int) -> None:
    gen = torch.Generator().manual_seed(9)
    batch = make_batch("mixed", (6, 2), page_size, torch.float32, gen)
    want = naive_attention(batch)
    tables, ctx_lens = batch["block_tables"], batch["context_lens"]
    live = torch.zeros(batch["k_cache"].shape[:2], dtype=torch.bool)  # [num_pages, page_size]
    for b, ctx in enumerate(batch["ctx_lens"]):
        for j in range(ctx):
            live[int(tables[b, j // page_size]), j % page_size] = True
    batch["k_cache"][~live] = float("nan")  # never written: may hold anything
    batch["v_cache"][~live] = float("nan")
    used = torch.arange(tables.shape[1])[None, :] < -(-ctx_lens[:, None] // page_size)
    tables[~used] = 10**6  # padding far out of range: must never be read
    out = paged_attention(batch["q"], batch["k_cache"], batch["v_cache"], tables, ctx_lens,
                          batch["query_start_loc"], HEAD_DIM ** -0.5)
    torch.testing.assert_close(out, want, **TOL[torch.float32])


def test_empty_batch_returns_empty() -> None:
    batch = make_batch("decode", (4, 2), 4, torch.float32, torch.Generator().manual_seed(0))
    q = torch.zeros(0, 4, HEAD_DIM)
    for tables, lens, starts in [
        (batch["block_tables"][:0], batch["context_lens"][:0], torch.zeros(1, dtype=torch.int32)),
        (batch["block_tables"], batch["context_lens"], torch.zeros(5, dtype=torch.int32)),
    ]:
        out = paged_attention(q, batch["k_cache"], batch["v_cache"], tables, lens, starts, 0.25)
        assert out.shape == (0, 4, HEAD_DIM)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv_lands_in_the_pool_and_nowhere_else(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    batch = make_batch("chunked_prefill", (4, 2), 4, dtype, gen)
    pool_before = batch["pool"].clone()
    num_pages = batch["pool"].shape[0]
    slot_mapping = torch.randperm(num_pages * 4, generator=gen)[:7]
    slot_mapping[2] = -1  # a padding token: skipped
    k = torch.randn(7, 2, HEAD_DIM, generator=gen).to(dtype)
    v = torch.randn(7, 2, HEAD_DIM, generator=gen).to(dtype)
    write_kv(batch["k_cache"], batch["v_cache"], k, v, slot_mapping)
    want = pool_before.clone()
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            want[slot // 4, LAYER, 0, slot % 4] = k[t]
            want[slot // 4, LAYER, 1, slot % 4] = v[t]
    assert torch.equal(batch["pool"], want)
    assert not torch.equal(want, pool_before)


def test_bad_arguments_raise_named_error() -> None:
    batch = make_batch("decode", (6, 2), 4, torch.float32, torch.Generator().manual_seed(0))
    args = (batch["block_tables"], batch["context_lens"], batch["query_start_loc"], 0.25)
    with pytest.raises(KernelArgumentError, match="multiple"):
        paged_attention(torch.zeros(4, 5, HEAD_DIM), batch["k_cache"], batch["v_cache"], *args)
    with pytest.raises(KernelArgumentError, match="dtype"):
        paged_attention(batch["q"].half(), batch["k_cache"], batch["v_cache"], *args)
