"""DoRA row scale and SHiRA sparse gather references against naive fp32 loops."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels import KernelArgumentError, dora_scale, shira_gather

D_IN, D_OUT, NUM_TOKENS = 16, 24, 20
WIDTH = D_IN + D_OUT  # SHiRA row width
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}
POPULARITY = ("distinct", "uniform", "zipf", "identical", "skewed")


def make_slots(popularity: str, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    """[T] int64 slot per token, about a quarter of them -1 (no adapter)."""
    if popularity == "distinct":
        slots = torch.randperm(num_slots, generator=gen)
    elif popularity == "uniform":
        slots = torch.randint(0, num_slots, (NUM_TOKENS,), generator=gen)
    elif popularity == "zipf":
        weights = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64) ** 1.5
        slots = torch.multinomial(weights, NUM_TOKENS, replacement=True, generator=gen)
    elif popularity == "identical":
        slots = torch.full((NUM_TOKENS,), 1)
    else:
        slots = torch.full((NUM_TOKENS,), 1)
        slots[torch.randperm(NUM_TOKENS, generator=gen)[:3]] = torch.tensor([0, 2, 3])
    slots = slots.long()
    slots[torch.rand(slots.shape[0], generator=gen) < 0.25] = -1
    return slots


def poisoned_out(slots: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """[T, d_out] random column slice of a wider tensor, NaN where no adapter applies."""
    base = torch.randn(slots.shape[0], D_OUT + 6, generator=gen).to(dtype)
    base[slots < 0] = float("nan")
    return base[:, 3:3 + D_OUT]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("popularity", POPULARITY)
def test_dora_scale_matches_naive_loop(popularity: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(POPULARITY.index(popularity) + dtype.itemsize)
    num_slots = 6
    pool_flat = (torch.rand(D_OUT * 20, generator=gen) + 0.5).to(dtype)
    g_rows = torch.randperm(18, generator=gen)[:num_slots] * D_OUT + 3
    g_rows[[2, 4]] = -1  # LoRA slots among DoRA ones: left unscaled
    slots = make_slots(popularity, num_slots, gen)
    out = poisoned_out(slots, dtype, gen)
    want = out.float().clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0 and g_rows[s] >= 0:
            want[t] *= pool_flat[int(g_rows[s]):int(g_rows[s]) + D_OUT].float()
    dora_scale(out, pool_flat, g_rows, slots)
    torch.testing.assert_close(out.float(), want, equal_nan=True, **TOL[dtype])


def make_shira_pool(nnz: list[int], max_rows: int, dtype: torch.dtype,
                    gen: torch.Generator) -> dict:
    """Pool with each slot's value rows and int32 position rows in shuffled, unaligned cells.

    Positions repeat on purpose (duplicates must add up); row tails past nnz hold garbage.
    Returns the tables plus the true (rows, cols, values) per slot for the oracle.
    """
    cell_bytes = WIDTH * 4 + 16
    num_cells = 2 * len(nnz) * max_rows + 4
    elem = torch.tensor([], dtype=dtype).element_size()
    pool_flat = torch.randn(num_cells * cell_bytes // elem, generator=gen).to(dtype)
    pool_i32 = pool_flat.view(torch.int32)
    cells = iter((torch.randperm(num_cells, generator=gen) * cell_bytes).tolist())
    value_rows = torch.full((len(nnz), max_rows), 10**12, dtype=torch.int64)
    index_rows = torch.full((len(nnz), max_rows), -3, dtype=torch.int64)
    truth = []
    for s, n in enumerate(nnz):
        values = torch.randn(n, generator=gen).to(dtype)
        positions = torch.randint(0, D_OUT * D_IN, (n,), generator=gen, dtype=torch.int32)
        positions[n // 2:n // 2 + min(3, n // 2)] = positions[:min(3, n // 2)]
        for r in range(-(-n // WIDTH)):
            jitter = int(torch.randint(0, 3, (1,), generator=gen))
            value_rows[s, r] = next(cells) // elem + jitter
            index_rows[s, r] = next(cells) // 4 + jitter
            k = slice(r * WIDTH, min(n, (r + 1) * WIDTH))
            width = k.stop - k.start
            pool_flat[value_rows[s, r]:value_rows[s, r] + width] = values[k]
            pool_i32[index_rows[s, r]:index_rows[s, r] + width] = positions[k]
        truth.append((positions.long() // D_IN, positions.long() % D_IN, values.float()))
    return dict(pool_flat=pool_flat, pool_i32=pool_i32, value_rows=value_rows,
                index_rows=index_rows, nnz=torch.tensor(nnz, dtype=torch.int64),
                scales=torch.rand(len(nnz), generator=gen) + 0.5, truth=truth)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("popularity", POPULARITY)
def test_shira_gather_matches_naive_loop(popularity: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(10 * POPULARITY.index(popularity) + dtype.itemsize)
    nnz = [1, WIDTH - 1, WIDTH, 2 * WIDTH + 5, 4 * WIDTH, 37]  # partial, exact and many rows
    p = make_shira_pool(nnz, max_rows=4, dtype=dtype, gen=gen)
    slots = make_slots(popularity, len(nnz), gen)
    x = torch.randn(slots.shape[0], D_IN, generator=gen).to(dtype)
    out = poisoned_out(slots, dtype, gen)
    want = out.float().clone()
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        rows, cols, values = p["truth"][s]
        for row, col, value in zip(rows.tolist(), cols.tolist(), values.tolist()):
            want[t, row] += float(p["scales"][s]) * value * float(x[t, col])
    shira_gather(x, p["pool_flat"], p["pool_i32"], p["value_rows"], p["index_rows"], p["nnz"],
                 p["scales"], slots, out)
    torch.testing.assert_close(out.float(), want, equal_nan=True, **TOL[dtype])


def test_shira_duplicates_add_up() -> None:
    gen = torch.Generator().manual_seed(5)
    p = make_shira_pool([6], max_rows=1, dtype=torch.float32, gen=gen)
    p["pool_i32"][p["index_rows"][0, 0]:p["index_rows"][0, 0] + 6] = 2 * D_IN + 5  # all at (2, 5)
    x = torch.randn(1, D_IN, generator=gen)
    out = torch.zeros(1, D_OUT)
    shira_gather(x, p["pool_flat"], p["pool_i32"], p["value_rows"], p["index_rows"], p["nnz"],
                 p["scales"], torch.zeros(1, dtype=torch.int64), out)
    want = torch.zeros(1, D_OUT)
    want[0, 2] = p["scales"][0] * p["truth"][0][2].sum() * x[0, 5]
    torch.testing.assert_close(out, want)


def test_bad_arguments_raise_named_error() -> None:
    pool = torch.randn(64)
    with pytest.raises(KernelArgumentError, match="g_rows"):
        dora_scale(torch.zeros(2, 4), pool, torch.zeros(3, dtype=torch.int32),
                   torch.zeros(2, dtype=torch.int64))
    with pytest.raises(KernelArgumentError, match="pool_i32"):
        shira_gather(torch.zeros(2, 4), pool, pool, torch.zeros(1, 1, dtype=torch.int64),
                     torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, dtype=torch.int64),
                     torch.ones(1), torch.zeros(2, dtype=torch.int64), torch.zeros(2, 4))
