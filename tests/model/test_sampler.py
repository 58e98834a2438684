"""Sampler vs transformers' logits warpers and plain-torch oracles: masks, draws, seeds,
log-probabilities."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from loraplex.model.sampler import (
    MAX_LOGPROBS,
    Sampler,
    SamplingParams,
    SamplingParamsError,
    apply_top_k_top_p,
    make_generator,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
VOCAB = 64


@dataclass(frozen=True)
class Filter:
    """One row's sampling rule."""

    temperature: float
    top_k: int
    top_p: float

    def params(self, **kwargs) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              **kwargs)


FILTERS = [
    Filter(1.0, 0, 1.0),            # nothing removed
    Filter(0.7, 5, 1.0),            # top-k only
    Filter(1.3, 0, 0.9),            # top-p only
    Filter(0.5, 10, 0.5),           # both
    Filter(2.0, 3, 0.3),            # top-p tighter than top-k
    Filter(1.0, -1, 0.95),          # -1 keeps all, like 0
    Filter(0.9, VOCAB + 7, 0.8),    # k above the vocabulary keeps all
    Filter(3.0, 40, 0.99),
    Filter(0.25, 2, 1.0),
    Filter(1.0, 0, 1e-9),           # top-p keeps the most likely token however small p is
]


def hf_warp(row: torch.Tensor, f: Filter) -> torch.Tensor:
    """transformers' own pipeline (temperature → top-k → top-p) on one row of logits."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(f.temperature)])
    if f.top_k > 0:
        warpers.append(TopKLogitsWarper(f.top_k))
    if f.top_p < 1.0:
        warpers.append(TopPLogitsWarper(f.top_p))
    dummy_ids = torch.zeros(1, 1, dtype=torch.long, device=row.device)
    return warpers(dummy_ids, row[None].clone())[0]


def ours_warp(logits: torch.Tensor, filters: list[Filter]) -> torch.Tensor:
    device = logits.device
    temps = torch.tensor([f.temperature for f in filters], device=device)
    top_k = torch.tensor([f.top_k for f in filters], device=device)
    top_p = torch.tensor([f.top_p for f in filters], dtype=torch.float64, device=device)
    return apply_top_k_top_p(logits / temps[:, None], top_k, top_p)


def random_logits(num_rows: int, vocab: int, seed: int, device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (3.0 * torch.randn(num_rows, vocab, generator=gen)).to(device)


# ---- masking --------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(5))
def test_mask_equals_transformers_warpers_with_mixed_rows(seed: int, device: str):
    rng = random.Random(seed)
    filters = [rng.choice(FILTERS) for _ in range(12)] + FILTERS
    rng.shuffle(filters)
    logits = random_logits(len(filters), VOCAB, seed, device)
    ours = ours_warp(logits, filters)
    expected = torch.stack([hf_warp(logits[i], f) for i, f in enumerate(filters)])
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    # CUDA divides by a Python scalar as a multiplication by its reciprocal (transformers'
    # temperature), by a tensor exactly (ours): the kept values may differ in the last bit.
    torch.testing.assert_close(ours, expected, rtol=0 if device == "cpu" else 1e-6, atol=0)
    # The grid does filter: some rows keep everything, some lose most of the vocabulary.
    kept = torch.isfinite(expected).sum(dim=-1)
    assert kept.max() == VOCAB and kept.min() <= 3


def test_top_k_keeps_ties_like_transformers():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 5, (8, VOCAB), generator=gen).float()  # many equal values
    filters = [Filter(1.0, k, 1.0) for k in (1, 2, 3, 7, 20, 33, 63, 64)]
    expected = torch.stack([hf_warp(logits[i], f) for i, f in enumerate(filters)])
    torch.testing.assert_close(ours_warp(logits, filters), expected, rtol=0, atol=0)
    assert (torch.isfinite(expected).sum(dim=-1) > torch.tensor([f.top_k for f in filters])).any()


def boundary_sweep() -> torch.Tensor:
    """[801, 2] rows (0, x): x steps one fp32 ulp at a time across the top-p = 0.9 boundary,
    where the smaller token's probability crosses 0.1."""
    centre = torch.tensor([math.log(0.1 / 0.9)], dtype=torch.float32)
    small = (centre.view(torch.int32) + torch.arange(-400, 401, dtype=torch.int32))
    small = small.view(torch.float32)
    return torch.stack([torch.zeros_like(small), small], dim=1)


def test_top_p_boundary_matches_transformers_to_the_last_bit():
    logits = boundary_sweep()
    filters = [Filter(1.0, 0, 0.9)] * len(logits)
    expected = torch.stack([hf_warp(logits[i], f) for i, f in enumerate(filters)])
    removed = torch.isinf(expected[:, 1])
    assert removed.any() and not removed.all(), "the sweep must straddle the boundary"
    torch.testing.assert_close(ours_warp(logits, filters), expected, rtol=0, atol=0)


def test_sampler_top_p_boundary_matches_transformers():
    """Through `Sampler.sample` (which builds the top-p tensor itself): the smaller token is
    drawn in 200 tries (0.9^200 ≈ 1e-9 to miss) exactly where transformers keeps it."""
    logits = boundary_sweep()
    kept = torch.stack([torch.isfinite(hf_warp(row, Filter(1.0, 0, 0.9))[1]) for row in logits])
    params = [SamplingParams(top_p=0.9)] * len(logits)
    torch.manual_seed(0)
    drawn = torch.zeros_like(kept)
    for _ in range(200):
        drawn |= Sampler().sample(logits, params, [None] * len(logits)).token_ids == 1
    assert torch.equal(drawn, kept), (drawn != kept).nonzero()


# ---- drawing --------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_are_argmax_and_sampled_rows_stay_in_the_kept_set(device: str):
    greedy = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=1),
              SamplingParams(temperature=1e-35), SamplingParams(temperature=0, seed=3)]
    params = greedy + [f.params() for f in FILTERS]
    logits = random_logits(len(params), VOCAB, 7, device)
    logits[2] *= 1e4  # huge logits with a tiny temperature must not overflow into NaN
    kept = torch.stack([torch.isfinite(hf_warp(logits[i], f)) for i, f in
                        enumerate(FILTERS, start=len(greedy))])
    sampler = Sampler()
    torch.manual_seed(0)
    seen = torch.zeros_like(kept)
    for step in range(300):
        gens = [make_generator(step, device) if i % 2 else None for i in range(len(params))]
        out = sampler.sample(logits, params, gens).token_ids
        assert out.dtype == torch.int64 and out.shape == (len(params),)
        assert out[:len(greedy)].tolist() == logits[:len(greedy)].argmax(-1).tolist()
        chosen = out[len(greedy):]
        assert kept.gather(1, chosen[:, None]).all(), f"step {step}: a removed token was drawn"
        seen.scatter_(1, chosen[:, None], True)
    # Small kept sets are covered entirely: nothing kept is unreachable.
    small = kept.sum(-1) <= 5
    assert small.any() and torch.equal(seen[small], kept[small])


def test_all_greedy_batch_is_argmax():
    logits = random_logits(5, VOCAB, 1)
    out = Sampler().sample(logits, [SamplingParams(temperature=0)] * 5, [None] * 5)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.logprobs is None and out.top_ids is None


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(χ² ≥ observed) for counts against expected probabilities (both over the kept set)."""
    expected = probs * counts.sum()
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor(len(counts) - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))


DRAW_CASES = [Filter(1.0, 0, 1.0), Filter(0.8, 6, 1.0), Filter(1.5, 0, 0.8),
              Filter(0.6, 5, 0.9), Filter(2.5, 0, 1.0)]


@pytest.mark.parametrize("seeded", [False, True], ids=["global-rng", "seeded"])
@pytest.mark.parametrize("f", DRAW_CASES, ids=str)
def test_draws_follow_softmax_over_the_kept_set(f: Filter, seeded: bool):
    vocab = 10
    logits = torch.tensor([[2.0, 1.5, 1.2, 1.0, 0.6, 0.3, 0.0, -0.4, -1.0, -2.0]])
    kept = torch.isfinite(hf_warp(logits[0], f))
    # The oracle: softmax(logits / T) restricted to what transformers keeps, in fp64.
    probs = torch.softmax(logits[0].double() / f.temperature, dim=-1)[kept]
    probs = probs / probs.sum()
    num_draws = 4000 if seeded else 40000
    rows = logits.expand(num_draws, vocab).contiguous()
    torch.manual_seed(1234)
    gens = [make_generator(10_000 + i, "cpu") if seeded else None for i in range(num_draws)]
    tokens = Sampler().sample(rows, [f.params()] * num_draws, gens).token_ids
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[~kept].sum() == 0
    assert chi_square_p_value(counts[kept], probs) > 1e-3, (counts[kept] / num_draws, probs)


# ---- seeds ----------------------------------------------------------------------------------
TARGETS = [SamplingParams(temperature=1.0, seed=42),
           SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=42)]
NEIGHBOURS = [SamplingParams(temperature=0), SamplingParams(temperature=1.2, top_k=3),
              SamplingParams(temperature=0.7, top_p=0.5), SamplingParams(seed=42),
              SamplingParams(seed=7, top_k=10), SamplingParams(temperature=1.1)]
STEPS = 16


def draw_in_batch(target: SamplingParams, target_logits: torch.Tensor, seed: int,
                  layout: random.Random | None, device: str) -> list[int]:
    """The target's tokens over STEPS steps: alone, or (with `layout`) at a random place in
    batches of random neighbours, while the global random stream moves between steps."""
    gen = make_generator(seed, device)
    neighbour_gens = [make_generator(p.seed, device) for p in NEIGHBOURS]
    tokens = []
    for step in range(STEPS):
        rows = [(target_logits[step], target, gen)]
        if layout is not None:
            noise = torch.Generator().manual_seed(layout.randrange(2**31))
            for _ in range(layout.randint(1, 6)):
                j = layout.randrange(len(NEIGHBOURS))
                row = torch.randn(target_logits.shape[-1], generator=noise).to(device)
                rows.append((row, NEIGHBOURS[j], neighbour_gens[j]))
            layout.shuffle(rows)
            torch.rand(layout.randint(1, 1000))
        at = next(i for i, (_, _, g) in enumerate(rows) if g is gen)
        out = Sampler().sample(torch.stack([r[0] for r in rows]), [r[1] for r in rows],
                               [r[2] for r in rows])
        tokens.append(int(out.token_ids[at]))
    return tokens


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target", TARGETS, ids=["plain", "filtered"])
def test_seeded_row_draws_the_same_tokens_whatever_shares_its_batch(target, device):
    logits = random_logits(STEPS, VOCAB, 99, device) / 3.0  # high entropy: every draw matters
    alone = draw_in_batch(target, logits, target.seed, None, device)
    for trial in range(6):
        torch.manual_seed(trial)
        assert draw_in_batch(target, logits, target.seed, random.Random(trial), device) == alone
    other_seed = draw_in_batch(target, logits, 43, None, device)
    assert other_seed != alone
    assert len(set(alone)) > 4, "the draws are not trivially one token"


def test_unseeded_rows_follow_the_global_generator():
    logits = random_logits(4, VOCAB, 5)
    params = [SamplingParams(), SamplingParams(seed=1), SamplingParams(), SamplingParams(seed=2)]
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        gens = [make_generator(p.seed, "cpu") for p in params]
        draws.append([Sampler().sample(logits, params, gens).token_ids.tolist()
                      for _ in range(10)])
    assert draws[0] == draws[1]
    unseeded = {tuple(row[i] for row in draws[0]) for i in (0, 2)}
    assert len(unseeded) == 2, "two unseeded rows draw independently"


def test_make_generator():
    assert make_generator(None, "cpu") is None
    gen = make_generator(1234, "cpu")
    assert torch.equal(torch.rand(5, generator=gen),
                       torch.rand(5, generator=torch.Generator().manual_seed(1234)))
    assert make_generator(2**64 - 1, "cpu") is not None
    assert make_generator(-(2**63), "cpu") is not None


# ---- log-probabilities ----------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_log_softmax_of_the_raw_logits(device: str):
    asked = [None, 0, 3, 5, None, 1, MAX_LOGPROBS]
    temps = [0.0, 1.0, 0.7, 0.0, 1.5, 2.0, 1.0]
    params = [SamplingParams(temperature=t, top_k=k, logprobs=lp)
              for t, k, lp in zip(temps, [0, 5, 0, 0, 3, 0, 0], asked, strict=True)]
    logits = random_logits(len(params), VOCAB, 11, device)
    torch.manual_seed(0)
    out = Sampler().sample(logits, params, [None] * len(params))
    oracle = torch.log_softmax(logits.double().cpu(), dim=-1)
    tokens = out.token_ids.cpu()
    torch.testing.assert_close(out.logprobs.cpu().double(), oracle[torch.arange(len(params)),
                                                                   tokens], rtol=0, atol=1e-5)
    top = torch.topk(oracle, MAX_LOGPROBS, dim=-1)
    assert out.top_ids.shape == (len(params), MAX_LOGPROBS)
    assert torch.equal(out.top_ids.cpu(), top.indices)
    torch.testing.assert_close(out.top_logprobs.cpu().double(), top.values, rtol=0, atol=1e-5)
    assert tokens[0] == logits[0].argmax() and tokens[3] == logits[3].argmax()


def test_logprobs_zero_gives_the_chosen_token_only():
    logits = random_logits(3, VOCAB, 2)
    params = [SamplingParams(logprobs=0), SamplingParams(), SamplingParams(temperature=0)]
    out = Sampler().sample(logits, params, [None] * 3)
    assert out.top_ids.shape == (3, 0) and out.top_logprobs.shape == (3, 0)
    expected = torch.log_softmax(logits.double(), -1).gather(1, out.token_ids[:, None])[:, 0]
    torch.testing.assert_close(out.logprobs.double(), expected, rtol=0, atol=1e-5)


def test_logprobs_for_a_vocabulary_smaller_than_asked():
    logits = random_logits(2, 8, 3)
    params = [SamplingParams(temperature=0, logprobs=MAX_LOGPROBS), SamplingParams()]
    out = Sampler().sample(logits, params, [None, None])
    assert out.top_ids.shape == (2, 8)
    assert torch.equal(out.top_ids, torch.topk(logits, 8).indices)


def test_no_logprobs_unless_asked():
    out = Sampler().sample(random_logits(3, VOCAB, 4), [SamplingParams()] * 3, [None] * 3)
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None


# ---- parameters -----------------------------------------------------------------------------
BAD_PARAMS = [
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.5), ("max_tokens", True),
    ("temperature", -0.1), ("temperature", 100.5), ("temperature", math.nan),
    ("temperature", math.inf), ("temperature", "hot"), ("temperature", None),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", math.nan), ("top_p", "1"),
    ("top_k", -2), ("top_k", 1.5), ("top_k", None),
    ("seed", "7"), ("seed", 2**64), ("seed", -(2**63) - 1), ("seed", 1.0),
    ("stop", [""]), ("stop", ["ok", 3]), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["2"]), ("stop_token_ids", 3),
    ("logprobs", -1), ("logprobs", MAX_LOGPROBS + 1), ("logprobs", 1.0),
]


@pytest.mark.parametrize(("field", "value"), BAD_PARAMS, ids=lambda v: repr(v))
def test_invalid_params_raise_naming_the_field(field: str, value):
    with pytest.raises(SamplingParamsError, match=field):
        SamplingParams(**{field: value})


def test_valid_params_are_normalised():
    p = SamplingParams(stop="###", stop_token_ids=[5, 6], top_k=-1, seed=-5, logprobs=0)
    assert p.stop == ("###",) and p.stop_token_ids == (5, 6)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(temperature=0).is_greedy and SamplingParams(top_k=1).is_greedy
    assert SamplingParams(temperature=1e-9).is_greedy
    assert not SamplingParams(temperature=0.01).is_greedy
    assert not SamplingParams(top_k=2).is_greedy
    SamplingParams(temperature=100, top_p=1, max_tokens=1, seed=2**64 - 1,
                   logprobs=MAX_LOGPROBS)
