"""Continuous batching: mixed adapters in one batch, late joiners, a pool too small, seeds."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from loraplex.model.sampler import SamplingParams
from tests.adapter_factory import AdapterSpec, make_peft_adapter
from tests.conftest import assert_pool_clean, make_engine

ARCH = "llama"
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECS = {
    "r1-all": AdapterSpec(kind="lora", r=1, alpha=4, target_modules=ALL, seed=21),
    "r8-qv": AdapterSpec(kind="lora", r=8, alpha=16, target_modules=("q_proj", "v_proj"), seed=22),
    "r64-all": AdapterSpec(kind="lora", r=64, alpha=64, target_modules=ALL, seed=23),
    "rs16-mlp": AdapterSpec(kind="rslora", r=16, alpha=8,
                            target_modules=("gate_proj", "up_proj", "down_proj"), seed=24),
    "pattern": AdapterSpec(kind="pattern", r=8, alpha=16, target_modules=ALL, seed=25),
    "dora8": AdapterSpec(kind="dora", r=8, alpha=16, target_modules=ALL, seed=26),
    "shira4": AdapterSpec(kind="shira", r=4, alpha=0, target_modules=("q_proj", "down_proj"),
                          seed=27),
    "r7-attn": AdapterSpec(kind="lora", r=7, alpha=7, target_modules=("q_proj", "k_proj",
                                                                      "v_proj", "o_proj"), seed=28),
}
MAX_TOKENS = 8
LONG = 48


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    base, _ = tiny_model_dir(ARCH)
    return {name: make_peft_adapter(base, spec, tmp_path_factory.mktemp(name))
            for name, spec in SPECS.items()}


@pytest.fixture(scope="module")
def expected(tiny_model_dir, adapter_dirs):
    """(adapter or None, prompt) → greedy tokens from PeftModel.generate, one request alone."""
    base, _ = tiny_model_dir(ARCH)
    # The engine runs with ignore_eos, which (unlike min_new_tokens) leaves EOS selectable:
    # give the oracle no EOS at all, so it neither stops nor suppresses it.
    models = {None: copy.deepcopy(base).eval()}
    for name, path in adapter_dirs.items():
        models[name] = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    cache: dict = {}

    def get(adapter: str | None, prompt_ids: list[int], n: int = MAX_TOKENS) -> list[int]:
        key = (adapter, tuple(prompt_ids), n)
        if key not in cache:
            with torch.no_grad():
                out = models[adapter].generate(
                    input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(
                        1, len(prompt_ids), dtype=torch.long),
                    max_new_tokens=n, do_sample=False, eos_token_id=None,
                    pad_token_id=0)
            cache[key] = out[0, len(prompt_ids):].tolist()
        return cache[key]

    return get


def workload(num: int) -> list[tuple[list[int], str | None]]:
    """Prompts of different lengths over every adapter and the base."""
    names = [None, *SPECS]
    g = torch.Generator().manual_seed(1234)
    return [(torch.randint(0, 128, (3 + (7 * i) % 23,), generator=g).tolist(),
             names[i % len(names)]) for i in range(num)]


def greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def register(engine, adapter_dirs) -> None:
    for name, path in adapter_dirs.items():
        engine.add_adapter(name, path)


def test_mixed_batch_equals_peft_generate(tiny_model_dir, adapter_dirs, expected):
    engine = make_engine(tiny_model_dir(ARCH)[1])
    register(engine, adapter_dirs)
    requests = workload(18)
    assert len({a for _, a in requests}) >= 8  # 8 adapters of 4 kinds, ranks 1..64, plus base
    outs = engine.generate([p for p, _ in requests], greedy(), [a for _, a in requests])
    for (p, a), out in zip(requests, outs):
        assert out.token_ids == expected(a, p), f"adapter {a}, prompt of {len(p)}"
        assert out.finish_reason == "length"
    assert_pool_clean(engine)


def test_late_joiners_get_the_tokens_they_get_alone(tiny_model_dir, adapter_dirs, expected):
    engine = make_engine(tiny_model_dir(ARCH)[1], max_batched_tokens=16)
    register(engine, adapter_dirs)
    requests = workload(12)
    results: dict[str, list[int]] = {}
    ids = {}
    step = 0
    while len(results) < len(requests):
        # Request i arrives at step 2i: into a batch that is mid-prefill and mid-decode.
        for i, (p, a) in enumerate(requests):
            if step == 2 * i:
                ids[engine.add_request(p, greedy(), a)] = i
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.token_ids
        step += 1
    for rid, tokens in results.items():
        p, a = requests[ids[rid]]
        assert tokens == expected(a, p)
    assert_pool_clean(engine)


def test_small_pool_preempts_evicts_and_still_matches(tiny_model_dir, adapter_dirs, expected):
    # 80 pages of 16 tokens: the rank-64 adapter alone takes 64 of them, and the 16 requests'
    # K/V would take about 70.
    engine = make_engine(tiny_model_dir(ARCH)[1], num_pages=80, max_resident_adapters=4)
    register(engine, adapter_dirs)
    # Long generations: decode keeps growing K/V after admission until the pool runs dry.
    requests = workload(16)
    outs = engine.generate([p for p, _ in requests], greedy(LONG), [a for _, a in requests])
    for (p, a), out in zip(requests, outs):
        assert out.token_ids == expected(a, p, LONG)
    assert engine.scheduler.num_preemptions > 0
    assert engine.residency.num_evictions > 0
    assert engine.residency.num_loads > len(SPECS)  # some adapter came back after eviction
    assert_pool_clean(engine)


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_model_dir, adapter_dirs):
    engine = make_engine(tiny_model_dir(ARCH)[1])
    register(engine, adapter_dirs)
    p = workload(1)[0][0]
    params = SamplingParams(max_tokens=12, temperature=1.3, top_p=0.9, top_k=50, seed=77,
                            ignore_eos=True)
    [alone] = engine.generate([p], params, ["r8-qv"])
    others = workload(9)
    mixed = engine.generate(
        [q for q, _ in others[:4]] + [p] + [q for q, _ in others[4:]],
        [SamplingParams(max_tokens=12, temperature=1.0, seed=i, ignore_eos=True)
         for i in range(4)] + [params] + [greedy(12)] * 5,
        [a for _, a in others[:4]] + ["r8-qv"] + [a for _, a in others[4:]])
    assert mixed[4].token_ids == alone.token_ids
    other_seed = engine.generate([p], SamplingParams(max_tokens=12, temperature=1.3, top_p=0.9,
                                                     top_k=50, seed=78, ignore_eos=True),
                                 ["r8-qv"])[0]
    assert other_seed.token_ids != alone.token_ids
    assert_pool_clean(engine)


def test_one_adapter_per_batch_still_matches(tiny_model_dir, adapter_dirs, expected):
    """Adapter batching switched off (the load test's baseline): one adapter at a time."""
    engine = make_engine(tiny_model_dir(ARCH)[1], max_adapters_per_batch=1)
    register(engine, adapter_dirs)
    requests = workload(14)
    ids = [engine.add_request(p, greedy(), a) for p, a in requests]
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] = out.token_ids
        running = {s.request.adapter.uid if s.request.adapter else -1
                   for s in engine.scheduler.running}
        assert len(running) <= 1
    for rid, (p, a) in zip(ids, requests):
        assert tokens[rid] == expected(a, p)
    assert_pool_clean(engine)
