"""LoRA shrink/expand references (decode and segment forms) against naive fp32 loops."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels import (
    KernelArgumentError,
    lora_expand,
    lora_expand_segments,
    lora_shrink,
    lora_shrink_segments,
)
from loraplex.kernels.lora import group_tokens

D_IN, D_OUT, NUM_SLOTS, NUM_TOKENS = 24, 40, 8, 24
RANKS = (1, 7, 8, 64, 8, 1, 64, 7)  # per slot: every rank of the grid mixed in one call
MAX_RANK = 64
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}
POPULARITY = ("distinct", "uniform", "zipf", "identical", "skewed")


def make_pool(dtype: torch.dtype, gen: torch.Generator) -> dict:
    """A random pool with each slot's A rows and Bᵀ rows scattered out of order, unaligned."""
    cell = D_IN + D_OUT + 5
    num_rows = sum(RANKS) * 2
    pool_flat = (torch.randn(cell * (num_rows + 3), generator=gen) * 0.3).to(dtype)
    cells = torch.randperm(num_rows + 3, generator=gen)[:num_rows] * cell
    cells += torch.randint(0, 5, (num_rows,), generator=gen)
    # Garbage past each rank: out-of-range and negative offsets must never be read.
    a_rows = torch.full((NUM_SLOTS, MAX_RANK), 10**12, dtype=torch.int64)
    b_rows = torch.full((NUM_SLOTS, MAX_RANK), -7, dtype=torch.int64)
    used = 0
    for s, r in enumerate(RANKS):
        a_rows[s, :r], b_rows[s, :r] = cells[used:used + r], cells[used + r:used + 2 * r]
        used += 2 * r
    return dict(
        pool_flat=pool_flat, a_rows=a_rows, b_rows=b_rows,
        ranks=torch.tensor(RANKS, dtype=torch.int64),
        scales=torch.rand(NUM_SLOTS, generator=gen) * 2 + 0.5,
    )


def make_slots(popularity: str, with_none: bool, gen: torch.Generator) -> torch.Tensor:
    """[T] int64 slot per token following a popularity pattern; -1 for some when `with_none`."""
    if popularity == "distinct":
        slots = torch.randperm(NUM_SLOTS, generator=gen)
    elif popularity == "uniform":
        slots = torch.randint(0, NUM_SLOTS, (NUM_TOKENS,), generator=gen)
    elif popularity == "zipf":
        weights = 1.0 / torch.arange(1, NUM_SLOTS + 1, dtype=torch.float64) ** 1.5
        slots = torch.multinomial(weights, NUM_TOKENS, replacement=True, generator=gen)
    elif popularity == "identical":
        slots = torch.full((NUM_TOKENS,), 3)
    else:  # skewed: one hot adapter, a few stragglers of other ranks
        slots = torch.full((NUM_TOKENS,), 3)
        slots[torch.randperm(NUM_TOKENS, generator=gen)[:5]] = torch.tensor([0, 1, 2, 4, 6])
    slots = slots.long()
    if with_none:
        slots[torch.rand(slots.shape[0], generator=gen) < 0.3] = -1
    return slots


def naive_lora(x: torch.Tensor, p: dict, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h [T, R], delta [T, d_out]) by loops over tokens and rank rows, in fp32."""
    pool = p["pool_flat"].float()
    h = torch.zeros(x.shape[0], MAX_RANK)
    delta = torch.zeros(x.shape[0], D_OUT)
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        for i in range(RANKS[s]):
            a_off, b_off = int(p["a_rows"][s, i]), int(p["b_rows"][s, i])
            h[t, i] = (pool[a_off:a_off + D_IN] * x[t].float()).sum()
            delta[t] += float(p["scales"][s]) * h[t, i] * pool[b_off:b_off + D_OUT]
    return h, delta


def make_out(num_tokens: int, dtype: torch.dtype, slots: torch.Tensor, layout: str,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, out): out random, NaN on tokens without adapter; a column slice of base if asked."""
    base = torch.randn(num_tokens, D_OUT + 9, generator=gen).to(dtype)
    base[slots < 0] = float("nan")
    out = base[:, 4:4 + D_OUT] if layout == "column_slice" else base[:, :D_OUT].contiguous()
    return base, out


@pytest.fixture(params=["dense", "grouped"], autouse=True)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on both reference paths: masked dense (decode-sized batches) and
    grouped bmm (what larger batches take)."""
    from loraplex.kernels import lora

    if request.param == "grouped":
        monkeypatch.setattr(lora, "DENSE_LIMIT", -1)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_none", [False, True])
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("layout", ["contiguous", "column_slice"])
def test_shrink_expand_match_naive_loops(popularity: str, with_none: bool, dtype: torch.dtype,
                                         layout: str) -> None:
    seed = POPULARITY.index(popularity) * 8 + 4 * with_none + dtype.itemsize
    gen = torch.Generator().manual_seed(seed)
    p = make_pool(dtype, gen)
    slots = make_slots(popularity, with_none, gen)
    x = torch.randn(slots.shape[0], D_IN, generator=gen).to(dtype)
    want_h, want_delta = naive_lora(x, p, slots)

    h = lora_shrink(x, p["pool_flat"], p["a_rows"], p["ranks"], slots)
    assert h.dtype == torch.float32 and h.shape == (slots.shape[0], MAX_RANK)
    torch.testing.assert_close(h, want_h, **TOL[torch.float32])

    base, out = make_out(slots.shape[0], dtype, slots, layout, gen)
    before = base.clone()
    lora_expand(want_h, p["pool_flat"], p["b_rows"], p["ranks"], p["scales"], slots, out)
    want = before[:, :D_OUT].float() if layout == "contiguous" else before[:, 4:4 + D_OUT].float()
    torch.testing.assert_close(out.float(), want + want_delta, equal_nan=True, **TOL[dtype])
    if layout == "column_slice":  # the columns around the slice are untouched
        torch.testing.assert_close(base[:, :4], before[:, :4], equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(base[:, 4 + D_OUT:], before[:, 4 + D_OUT:], equal_nan=True,
                                   rtol=0, atol=0)


def test_expand_ignores_h_past_the_rank() -> None:
    gen = torch.Generator().manual_seed(1)
    p = make_pool(torch.float32, gen)
    slots = make_slots("uniform", False, gen)
    x = torch.randn(slots.shape[0], D_IN, generator=gen)
    want_h, want_delta = naive_lora(x, p, slots)
    keep = torch.arange(MAX_RANK) < p["ranks"][slots][:, None]
    h = torch.where(keep, want_h, float("nan"))  # poison the columns past each rank
    out = torch.zeros(slots.shape[0], D_OUT)
    lora_expand(h, p["pool_flat"], p["b_rows"], p["ranks"], p["scales"], slots, out)
    torch.testing.assert_close(out, want_delta, **TOL[torch.float32])


def make_segments(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seg_starts [G+1], seg_slots [G], token slots [T]) with empty segments and a -1 segment."""
    lengths = [3, 0, 7, 1, 0, 9, 4]
    seg_slots = torch.tensor([2, 5, 3, -1, 0, 3, 6], dtype=torch.int64)
    seg_starts = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)
    token_slots = torch.tensor([s for s, n in zip(seg_slots.tolist(), lengths) for _ in range(n)])
    return seg_starts, seg_slots, token_slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_segments_match_naive_loops(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    p = make_pool(dtype, gen)
    seg_starts, seg_slots, token_slots = make_segments(gen)
    x = torch.randn(token_slots.shape[0], D_IN, generator=gen).to(dtype)
    want_h, want_delta = naive_lora(x, p, token_slots)

    h = lora_shrink_segments(x, p["pool_flat"], p["a_rows"], p["ranks"], seg_starts, seg_slots)
    torch.testing.assert_close(h, want_h, **TOL[torch.float32])
    base, out = make_out(token_slots.shape[0], dtype, token_slots, "column_slice", gen)
    before = out.float().clone()
    lora_expand_segments(want_h, p["pool_flat"], p["b_rows"], p["ranks"], p["scales"],
                         seg_starts, seg_slots, out)
    torch.testing.assert_close(out.float(), before + want_delta, equal_nan=True, **TOL[dtype])


def test_no_token_with_an_adapter_is_a_no_op() -> None:
    gen = torch.Generator().manual_seed(3)
    p = make_pool(torch.float32, gen)
    slots = torch.full((5,), -1, dtype=torch.int64)
    x = torch.randn(5, D_IN, generator=gen)
    assert torch.equal(lora_shrink(x, p["pool_flat"], p["a_rows"], p["ranks"], slots),
                       torch.zeros(5, MAX_RANK))
    out = torch.randn(5, D_OUT, generator=gen)
    before = out.clone()
    lora_expand(torch.randn(5, MAX_RANK), p["pool_flat"], p["b_rows"], p["ranks"], p["scales"],
                slots, out)
    assert torch.equal(out, before)
    empty = torch.zeros(0, D_IN)
    assert lora_shrink(empty, p["pool_flat"], p["a_rows"], p["ranks"],
                       torch.zeros(0, dtype=torch.int64)).shape == (0, MAX_RANK)


@pytest.mark.parametrize("popularity", POPULARITY)
def test_groups_cover_each_token_once_with_bounded_padding(popularity: str) -> None:
    gen = torch.Generator().manual_seed(11)
    slots = make_slots(popularity, True, gen)
    g = group_tokens(slots)
    assert g is not None
    flat = g.chunk * g.width + g.pos
    assert flat.unique().shape[0] == flat.shape[0]  # no two tokens share a padded place
    assert torch.equal(g.chunk_slots[g.chunk], slots[g.tokens])
    assert torch.equal(g.tokens.sort().values, torch.nonzero(slots >= 0).squeeze(1))
    assert g.chunk_slots.shape[0] * g.width <= 4 * g.tokens.shape[0]


def test_bad_arguments_raise_named_error() -> None:
    p = make_pool(torch.float32, torch.Generator().manual_seed(0))
    slots = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(KernelArgumentError, match="dtype"):
        lora_shrink(torch.randn(4, D_IN).half(), p["pool_flat"], p["a_rows"], p["ranks"], slots)
    with pytest.raises(KernelArgumentError, match="tokens"):
        lora_shrink(torch.randn(5, D_IN), p["pool_flat"], p["a_rows"], p["ranks"], slots)
    with pytest.raises(KernelArgumentError, match="rows"):
        lora_shrink(torch.randn(4, D_IN), p["pool_flat"], p["a_rows"].int(), p["ranks"], slots)
    with pytest.raises(KernelArgumentError, match="max_rank"):
        lora_expand(torch.randn(4, 3), p["pool_flat"], p["b_rows"], p["ranks"], p["scales"],
                    slots, torch.zeros(4, D_OUT))
