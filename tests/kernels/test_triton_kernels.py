"""Every LoRA, DoRA and SHiRA Triton twin against its torch reference (the references have loop
oracles elsewhere); paged attention and the K/V write are in `test_triton_attention.py`.

With CUDA the tests run here, at small and at Llama-3-8B shapes, in fp32, fp16 and bf16. Without
it they run under Triton's interpreter in a child pytest started with TRITON_INTERPRET=1 (why:
`triton_helpers.py`), so the Triton kernels are imported only when `RUN_HERE`. Outputs are
poisoned (NaN) first.
"""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("triton")

from loraplex.kernels import dispatch  # noqa: E402
from loraplex.kernels.dora import dora_scale_ref  # noqa: E402
from loraplex.kernels.lora import (  # noqa: E402
    lora_expand,
    lora_expand_ref,
    lora_expand_segments,
    lora_expand_segments_ref,
    lora_shrink_ref,
    lora_shrink_segments_ref,
    segments_to_token_slots,
)
from loraplex.kernels.lora_slices import lora_apply_ref, lora_apply_segments_ref  # noqa: E402
from loraplex.kernels.shira import shira_gather_ref  # noqa: E402
from tests.kernels.triton_helpers import (  # noqa: E402
    DEVICE,
    DTYPES,
    ON_CUDA,
    REL_TOL,
    RUN_HERE,
    SHAPES,
    SMALL,
    Shape,
    assert_close,
    drop_tests_not_run_here,
    exact_fp32_references,  # noqa: F401 (autouse fixture: no tf32 in fp32 references)
    gen_for,
    make_token_slots,
    poisoned_out,
    rel_err,
    run_in_interpreter_child,
    x_for,
)

if RUN_HERE:
    from loraplex.kernels import attention_triton as attn_t  # noqa: E402
    from loraplex.kernels import dora_triton as dora_t  # noqa: E402
    from loraplex.kernels import lora_slices_triton as slices_t  # noqa: E402
    from loraplex.kernels import lora_triton as lora_t  # noqa: E402
    from loraplex.kernels import shira_triton as shira_t  # noqa: E402


# ---- LoRA pools -----------------------------------------------------------------------------------

def make_lora_pool(shape: Shape, dtype: torch.dtype, aligned: bool, gen: torch.Generator,
                   num_slices: int = 1) -> dict:
    """A NaN-filled pool holding, per slice and slot, A rows and Bᵀ rows in shuffled cells.

    Unaligned offsets start a row at a random element (no 16-byte alignment); garbage offsets
    past each rank (far out of range, negative) must never be read; g rows for DoRA slots.
    """
    width = max(shape.d_in, *shape.d_outs)
    cell = -(-(width + 8) // 8) * 8
    rank_sum = sum(shape.ranks)
    num_cells = num_slices * (2 * rank_sum + len(shape.ranks)) + 5
    pool = torch.full((cell * num_cells,), float("nan"), dtype=dtype)
    cells = iter((torch.randperm(num_cells, generator=gen) * cell).tolist())
    num_slots, max_rank = len(shape.ranks), max(shape.ranks)
    a_rows = torch.full((num_slices, num_slots, max_rank), 10**12, dtype=torch.int64)
    b_rows = torch.full((num_slices, num_slots, max_rank), -7, dtype=torch.int64)
    g_rows = torch.full((num_slices, num_slots), -1, dtype=torch.int64)

    def put(length: int) -> int:
        offset = next(cells) + (0 if aligned else int(torch.randint(1, 8, (1,), generator=gen)))
        pool[offset:offset + length] = (torch.randn(length, generator=gen) * 0.5).to(dtype)
        return offset

    for n in range(num_slices):
        for s, r in enumerate(shape.ranks):
            a_rows[n, s, :r] = torch.tensor([put(shape.d_in) for _ in range(r)])
            b_rows[n, s, :r] = torch.tensor([put(shape.d_outs[n]) for _ in range(r)])
            if s % 3 != 1:  # DoRA slots among plain LoRA ones
                g_rows[n, s] = next(cells) + (0 if aligned else 3)
                pool[g_rows[n, s]:g_rows[n, s] + shape.d_outs[n]] = (
                    torch.rand(shape.d_outs[n], generator=gen) + 0.5).to(dtype)
    ranks = torch.tensor(shape.ranks, dtype=torch.int64).repeat(num_slices, 1)
    if num_slices > 1:
        ranks[1, 2] = 0  # a module this slot does not adapt (but DoRA's g still applies)
    to = dict(device=DEVICE)
    return dict(pool=pool.to(**to), a_rows=a_rows.to(**to), b_rows=b_rows.to(**to),
                ranks=ranks.to(**to), g_rows=g_rows.to(**to),
                scales=(torch.rand(num_slices, num_slots, generator=gen) + 0.5).to(**to))


# ---- LoRA decode ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("popularity,aligned", [("distinct", True), ("uniform", False),
                                                 ("skewed", True)])
def test_decode_shrink_expand_match_reference(shape: Shape, dtype: torch.dtype, popularity: str,
                                              aligned: bool) -> None:
    gen = gen_for("decode", shape.name, dtype, popularity)
    p = make_lora_pool(shape, dtype, aligned, gen)
    slots = make_token_slots(shape.num_tokens, len(shape.ranks), popularity, gen)
    x = x_for(shape.num_tokens, shape.d_in, dtype, gen)
    a_rows, b_rows, ranks, scales = p["a_rows"][0], p["b_rows"][0], p["ranks"][0], p["scales"][0]

    want_h = lora_shrink_ref(x, p["pool"], a_rows, ranks, slots)
    h = torch.full((1, *want_h.shape), float("nan"), device=DEVICE)
    lora_t.shrink_into(h, x, p["pool"], a_rows[None], ranks[None], slots, split_k=2)
    assert_close(h[0], want_h, torch.float32)

    d_out = shape.d_outs[0]
    wide, out = poisoned_out(shape.num_tokens, d_out, dtype, slots, gen)
    want_wide = wide.clone()
    lora_expand_ref(want_h, p["pool"], b_rows, ranks, scales, slots, want_wide[:, 3:3 + d_out])
    assert rel_err(want_wide, wide) > 20 * REL_TOL[dtype], "the adapters must matter"
    lora_t.lora_expand_triton(want_h, p["pool"], b_rows, ranks, scales, slots, out)
    assert_close(wide, want_wide, dtype)


SPLIT = Shape("split", 1024, (40, 16, 24), 7, (1, 7, 20, 16, 8))  # 4 × BLOCK_K, 2 rank blocks


@pytest.mark.parametrize("shape", [SPLIT] + SHAPES[1:], ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split_k", [1, 2, 4])
def test_fused_slices_split_k_and_dora_match_reference(shape: Shape, dtype: torch.dtype,
                                                       split_k: int) -> None:
    """q|k|v: d_in split over partial planes (poisoned first) that the expand sums; DoRA."""
    gen = gen_for("slices", shape.name, dtype, split_k)
    p = make_lora_pool(shape, dtype, False, gen, num_slices=3)
    slots = make_token_slots(shape.num_tokens, len(shape.ranks), "uniform", gen)
    x = x_for(shape.num_tokens, shape.d_in, dtype, gen)
    want_h = torch.stack([lora_shrink_ref(x, p["pool"], p["a_rows"][n], p["ranks"][n], slots)
                          for n in range(3)])
    partials = torch.full((split_k, *want_h.shape), float("nan"), device=DEVICE)
    lora_t.shrink_partials_into(partials, x, p["pool"], p["a_rows"], p["ranks"], slots)
    assert_close(partials.sum(0), want_h, torch.float32)
    h1 = lora_t.lora_shrink_triton(x, p["pool"], p["a_rows"][1], p["ranks"][1], slots, split_k)
    assert_close(h1, want_h[1], torch.float32)

    total = sum(shape.d_outs)
    wide, out = poisoned_out(shape.num_tokens, total, dtype, slots, gen)
    want_wide = wide.clone()
    args = (p["pool"], p["a_rows"], p["b_rows"], p["ranks"], p["scales"], slots)
    lora_apply_ref(x, *args, want_wide[:, 3:3 + total], shape.d_outs, p["g_rows"])
    assert rel_err(want_wide, wide) > 20 * REL_TOL[dtype], "the adapters must matter"
    slices_t.lora_apply_triton(x, *args, out, shape.d_outs, p["g_rows"], split_k=split_k)
    assert_close(wide, want_wide, dtype)


# ---- LoRA prefill (segments) ----------------------------------------------------------------------

def make_segments(lengths: list[int], seg_slots: list[int], lead: int,
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(seg_starts [G+1], seg_slots [G], T): `lead` tokens before the first segment and 2 after
    the last lie outside every segment."""
    starts = [lead]
    for n in lengths:
        starts.append(starts[-1] + n)
    return (torch.tensor(starts, device=DEVICE), torch.tensor(seg_slots, device=DEVICE),
            starts[-1] + 2)


SEGMENT_CASES = {
    # lengths 1 … 300, an empty segment, a segment without adapter (slot -1), repeated slots
    "mixed": ([1, 5, 0, 17, 3, 2, 33], [3, 0, 2, -1, 4, 3, 7]),
    "long": ([300, 1, 2], [4, 5, -1]),
    "one_token_each": ([1] * 6, [0, 1, 2, 3, -1, 5]),
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SEGMENT_CASES))
def test_segments_shrink_expand_match_reference(shape: Shape, dtype: torch.dtype,
                                                case: str) -> None:
    lengths, slot_list = SEGMENT_CASES[case]
    if case == "long" and shape is SMALL:  # the 300-token segment in a cheap shape
        shape = Shape("cheap", 16, (24,), 0, (1, 7, 8, 16, 64, 8))
    gen = gen_for("segments", shape.name, dtype, case)
    p = make_lora_pool(shape, dtype, case != "mixed", gen)
    seg_starts, seg_slots, num_tokens = make_segments(lengths, slot_list, lead=1)
    x = x_for(num_tokens, shape.d_in, dtype, gen)
    a_rows, b_rows, ranks, scales = p["a_rows"][0], p["b_rows"][0], p["ranks"][0], p["scales"][0]

    want_h = lora_shrink_segments_ref(x, p["pool"], a_rows, ranks, seg_starts, seg_slots)
    h = torch.full((1, *want_h.shape), float("nan"), device=DEVICE)
    lora_t.shrink_segments_into(h, x, p["pool"], a_rows[None], ranks[None], seg_starts, seg_slots)
    inside = slice(int(seg_starts[0]), int(seg_starts[-1]))  # outside: left as the caller had it
    assert_close(h[0, inside], want_h[inside], torch.float32)
    got_h = lora_t.lora_shrink_segments_triton(x, p["pool"], a_rows, ranks, seg_starts, seg_slots)
    assert_close(got_h, want_h, torch.float32)

    d_out = shape.d_outs[0]
    token_slots = segments_to_token_slots(seg_starts, seg_slots, num_tokens)
    for g_rows in (None, p["g_rows"][0]):
        wide, out = poisoned_out(num_tokens, d_out, dtype, token_slots, gen)
        want_wide = wide.clone()
        want_out = want_wide[:, 3:3 + d_out]
        lora_expand_segments_ref(want_h, p["pool"], b_rows, ranks, scales, seg_starts, seg_slots,
                                 want_out)
        if g_rows is not None:
            dora_scale_ref(want_out, p["pool"], g_rows, token_slots)
        lora_t.lora_expand_segments_triton(want_h, p["pool"], b_rows, ranks, scales, seg_starts,
                                           seg_slots, out, g_rows=g_rows)
        assert_close(wide, want_wide, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_segments_shares_one_block_map(dtype: torch.dtype) -> None:
    """Prefill q|k|v with DoRA: one block map for both launches (the launchers build none), and
    the h rows it leaves unwritten are never read (poisoned here; torch.empty in the twin)."""
    gen = gen_for("apply_segments", dtype)
    p = make_lora_pool(SMALL, dtype, False, gen, num_slices=3)
    seg_starts, seg_slots, num_tokens = make_segments(*SEGMENT_CASES["mixed"], lead=3)
    seg_starts = seg_starts.int()  # as the engine's query_start_loc
    x = x_for(num_tokens, SMALL.d_in, dtype, gen)
    total = sum(SMALL.d_outs)
    wide, out = poisoned_out(num_tokens, total, dtype,
                             segments_to_token_slots(seg_starts, seg_slots, num_tokens), gen)
    want_wide, before = wide.clone(), wide.clone()
    args = (p["pool"], p["a_rows"], p["b_rows"], p["ranks"], p["scales"], seg_starts, seg_slots)
    lora_apply_segments_ref(x, *args, want_wide[:, 3:3 + total], SMALL.d_outs, p["g_rows"])
    segment_map = lora_t.block_map(seg_starts, num_tokens)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(lora_t.shrink_segments_into.__globals__, "block_map", None)
        patch.setattr(slices_t, "block_map", lambda *_: segment_map)
        slices_t.lora_apply_segments_triton(x, *args, out, SMALL.d_outs, p["g_rows"])
    assert_close(wide, want_wide, dtype)
    wide.copy_(before)
    h = torch.full((3, num_tokens, max(SMALL.ranks)), float("nan"), device=DEVICE)
    lora_t.shrink_segments_into(h, x, p["pool"], p["a_rows"], p["ranks"], seg_starts, seg_slots,
                                segment_map=segment_map)
    lora_t.lora_expand_segments_slices_triton(h, p["pool"], *args[2:], out, SMALL.d_outs,
                                              p["g_rows"], segment_map=segment_map)
    assert_close(wide, want_wide, dtype)


# ---- DoRA, SHiRA -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d_out", [40] + ([14336] if ON_CUDA else []))
def test_dora_scale_matches_reference(dtype: torch.dtype, d_out: int) -> None:
    gen = gen_for("dora", dtype, d_out)
    pool = (torch.rand(d_out * 12, generator=gen) + 0.5).to(dtype).to(DEVICE)
    g_rows = (torch.randperm(10, generator=gen)[:6] * d_out + 3).to(DEVICE)
    g_rows[[2, 4]] = -1
    slots = make_token_slots(20, 6, "uniform", gen)
    wide, out = poisoned_out(20, d_out, dtype, slots, gen)
    want = wide.clone()
    dora_scale_ref(want[:, 3:3 + d_out], pool, g_rows, slots)
    dora_t.dora_scale_triton(out, pool, g_rows, slots)
    assert_close(wide, want, dtype)


def make_shira(d_in: int, d_out: int, nnz: list[int], dtype: torch.dtype,
               gen: torch.Generator) -> dict:
    """Pool with each slot's value rows and int32 position rows (W = d_in + d_out) in shuffled
    cells, positions repeated on purpose (duplicates add)."""
    width = d_in + d_out
    elem = torch.tensor([], dtype=dtype).element_size()
    max_rows = max(-(-n // width) for n in nnz)
    cell_bytes = width * 4 + 16
    num_cells = 2 * len(nnz) * max_rows + 4
    pool = torch.full((num_cells * cell_bytes // elem,), float("nan"), dtype=dtype)
    pool_i32 = pool.view(torch.int32)
    cells = iter((torch.randperm(num_cells, generator=gen) * cell_bytes).tolist())
    value_rows = torch.full((len(nnz), max_rows), 10**12, dtype=torch.int64)
    index_rows = torch.full((len(nnz), max_rows), -3, dtype=torch.int64)
    for s, n in enumerate(nnz):
        values = torch.randn(n, generator=gen).to(dtype)
        positions = torch.randint(0, d_out * d_in, (n,), generator=gen, dtype=torch.int32)
        positions[n // 2:n // 2 + min(3, n // 2)] = positions[:min(3, n // 2)]
        for r in range(-(-n // width)):
            value_rows[s, r] = next(cells) // elem + r % 3
            index_rows[s, r] = next(cells) // 4 + r % 3
            k = slice(r * width, min(n, (r + 1) * width))
            pool[value_rows[s, r]:value_rows[s, r] + k.stop - k.start] = values[k]
            pool_i32[index_rows[s, r]:index_rows[s, r] + k.stop - k.start] = positions[k]
    to = dict(device=DEVICE)
    pool = pool.to(**to)
    return dict(pool=pool, pool_i32=pool.view(torch.int32), value_rows=value_rows.to(**to),
                index_rows=index_rows.to(**to), nnz=torch.tensor(nnz, **to),
                scales=(torch.rand(len(nnz), generator=gen) + 0.5).to(**to))


SHIRA_SHAPES = [(16, 24, [1, 39, 40, 85, 160, 37])] + (
    [(4096, 4096, [167_772, 40_000, 8191, 1])] if ON_CUDA else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d_in,d_out,nnz", SHIRA_SHAPES, ids=lambda v: str(v)[:12])
def test_shira_gather_matches_reference(dtype: torch.dtype, d_in: int, d_out: int,
                                        nnz: list[int]) -> None:
    gen = gen_for("shira", dtype, d_in)
    p = make_shira(d_in, d_out, nnz, dtype, gen)
    slots = make_token_slots(20, len(nnz), "uniform", gen)
    x = x_for(20, d_in, dtype, gen)
    wide, out = poisoned_out(20, d_out, dtype, slots, gen)
    want = wide.clone()
    args = (p["pool"], p["pool_i32"], p["value_rows"], p["index_rows"], p["nnz"], p["scales"],
            slots)
    shira_gather_ref(x, *args, want[:, 3:3 + d_out])
    assert rel_err(want, wide) > 20 * REL_TOL[dtype], "the adapters must matter"
    shira_t.shira_gather_triton(x, *args, out)
    assert_close(wide, want, dtype)


# ---- empty batches, dispatch ----------------------------------------------------------------------

def test_empty_batches_launch_nothing_and_return_empty() -> None:
    p = make_lora_pool(SMALL, torch.float32, True, gen_for("empty"))
    a_rows, b_rows, ranks, scales = p["a_rows"][0], p["b_rows"][0], p["ranks"][0], p["scales"][0]
    none = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    x = torch.zeros(0, SMALL.d_in, device=DEVICE)
    out = torch.zeros(0, SMALL.d_outs[0], device=DEVICE)
    assert lora_t.lora_shrink_triton(x, p["pool"], a_rows, ranks, none).shape == (0, 128)
    lora_t.lora_expand_triton(torch.zeros(0, 128, device=DEVICE), p["pool"], b_rows, ranks,
                              scales, none, out)
    starts = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    assert lora_t.lora_shrink_segments_triton(x, p["pool"], a_rows, ranks, starts,
                                              none).shape == (0, 128)
    # Tokens present but no segment and no adapter: nothing written.
    x3 = torch.randn(3, SMALL.d_in, device=DEVICE)
    h = lora_t.lora_shrink_segments_triton(x3, p["pool"], a_rows, ranks, starts, none)
    assert torch.equal(h, torch.zeros_like(h))
    all_none = torch.full((3,), -1, dtype=torch.int64, device=DEVICE)
    assert torch.equal(lora_t.lora_shrink_triton(x3, p["pool"], a_rows, ranks, all_none),
                       torch.zeros(3, 128, device=DEVICE))
    nan_out = torch.full((3, SMALL.d_outs[0]), float("nan"), device=DEVICE)
    lora_t.lora_expand_triton(torch.randn(3, 128, device=DEVICE), p["pool"], b_rows, ranks,
                              scales, all_none, nan_out, g_rows=p["g_rows"][0])
    assert torch.isnan(nan_out).all()
    dora_t.dora_scale_triton(out, p["pool"], p["g_rows"][0], none)
    q = torch.zeros(0, 4, 16, device=DEVICE)
    cache = torch.zeros(2, 4, 2, 16, device=DEVICE)
    assert attn_t.paged_attention_triton(
        q, cache, cache, torch.zeros(0, 1, dtype=torch.int32, device=DEVICE),
        torch.zeros(0, dtype=torch.int32, device=DEVICE),
        torch.zeros(1, dtype=torch.int32, device=DEVICE), 0.25).shape == (0, 4, 16)


def test_public_expand_with_g_rows_equals_expand_then_dora_scale() -> None:
    """The public g_rows option: fused on CUDA, reference expand + dora_scale elsewhere."""
    shape = SMALL
    gen = gen_for("public_g")
    p = make_lora_pool(shape, torch.float32, False, gen)
    slots = make_token_slots(shape.num_tokens, len(shape.ranks), "uniform", gen)
    h = torch.randn(shape.num_tokens, max(shape.ranks), generator=gen).to(DEVICE)
    args = (h, p["pool"], p["b_rows"][0], p["ranks"][0], p["scales"][0])
    wide, out = poisoned_out(shape.num_tokens, shape.d_outs[0], torch.float32, slots, gen)
    want_wide = wide.clone()
    want = want_wide[:, 3:3 + shape.d_outs[0]]
    lora_expand_ref(*args, slots, want)
    dora_scale_ref(want, p["pool"], p["g_rows"][0], slots)
    lora_expand(*args, slots, out, g_rows=p["g_rows"][0])
    assert_close(wide, want_wide, torch.float32)

    seg_starts, seg_slots, num_tokens = make_segments([3, 4, 1], [2, 0, 5], lead=1)
    token_slots = torch.tensor([-1, 2, 2, 2, 0, 0, 0, 0, 5, -1, -1], device=DEVICE)
    h = torch.randn(num_tokens, max(shape.ranks), generator=gen).to(DEVICE)
    args = (h, p["pool"], p["b_rows"][0], p["ranks"][0], p["scales"][0], seg_starts, seg_slots)
    wide, out = poisoned_out(num_tokens, shape.d_outs[0], torch.float32, token_slots, gen)
    want_wide = wide.clone()
    want = want_wide[:, 3:3 + shape.d_outs[0]]
    lora_expand_segments_ref(*args, want)
    dora_scale_ref(want, p["pool"], p["g_rows"][0], token_slots)
    lora_expand_segments(*args, out, g_rows=p["g_rows"][0])
    assert_close(wide, want_wide, torch.float32)


def test_every_reference_has_a_triton_twin_with_its_signature() -> None:
    import loraplex.kernels as kernels

    refs = [getattr(kernels, name) for name in kernels.__all__ if name.endswith("_ref")]
    assert len(refs) >= 14
    for ref in refs:
        twin = dispatch.triton_twin(ref)
        assert twin is not None, f"{ref.__name__} has no Triton twin"
        ref_params = list(inspect.signature(ref).parameters)
        twin_params = list(inspect.signature(twin).parameters)
        assert twin_params[:len(ref_params)] == ref_params, twin.__name__
        extra = [inspect.signature(twin).parameters[n] for n in twin_params[len(ref_params):]]
        assert all(e.default is not inspect.Parameter.empty for e in extra), twin.__name__
    if ON_CUDA:
        assert dispatch.pick(lora_shrink_ref, DEVICE) is lora_t.lora_shrink_triton


def test_interpreter_suite_in_child_process() -> None:
    """Without CUDA: this module's tests under TRITON_INTERPRET=1 in a fresh interpreter."""
    run_in_interpreter_child(__file__)


drop_tests_not_run_here(globals())
