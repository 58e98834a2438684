"""Thousands of adapters: 2,000 registered (LoRA and rsLoRA of ranks 1-32 written straight to
PEFT files, DoRA and SHiRA made by peft), a power-law trace over all of them through a small
host tier: every sampled response equals the offline engine's and PeftModel.generate's, the host
tier never exceeds its bound, and every page is free at the end."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file

from loraplex.model.config import ModelConfig
from loraplex.model.sampler import SamplingParams
from tests.adapter_factory import AdapterSpec, make_peft_adapter
from tests.conftest import assert_pool_clean, make_engine

ARCH = "llama"
NUM_WRITTEN = 1994
PEFT_SPECS = {
    f"{kind}-{i}": AdapterSpec(kind=kind, r=r, alpha=2 * r, target_modules=targets, seed=700 + i)
    for i, (kind, r, targets) in enumerate([
        ("dora", 8, ("q_proj", "v_proj", "down_proj")), ("dora", 4, ("o_proj", "up_proj")),
        ("dora", 16, ("k_proj", "gate_proj")), ("shira", 4, ("q_proj", "down_proj")),
        ("shira", 8, ("v_proj", "up_proj")), ("shira", 2, ("o_proj", "gate_proj"))])
}
TARGET_SETS = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
               ("gate_proj", "up_proj", "down_proj"),
               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
RANKS = (1, 2, 4, 8, 16, 32)
HOST_CACHE_BYTES = 2 * 2**20  # about 2% of the 2,000 adapters fit: the rest wait on disk


def write_random_lora(path: Path, config: ModelConfig, rank: int, targets: tuple[str, ...],
                      seed: int, rslora: bool = False) -> Path:
    """A PEFT LoRA folder (safetensors + adapter_config.json) with random A and B ≠ 0."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for m in targets:
            d_out, d_in = config.module_shape(m)
            part = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) / d_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.1
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": rslora, "use_dora": False}))
    return path


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """name → folder: 1,994 written directly plus 6 DoRA/SHiRA made by peft."""
    base, model_dir = tiny_model_dir(ARCH)
    config = ModelConfig.from_dir(model_dir)
    root = tmp_path_factory.mktemp("many")
    out = {}
    for i in range(NUM_WRITTEN):
        rank, targets = RANKS[i % len(RANKS)], TARGET_SETS[(i // 3) % len(TARGET_SETS)]
        name = f"lora-{i:04d}"
        out[name] = write_random_lora(root / name, config, rank, targets, seed=i,
                                      rslora=i % 5 == 0)
    for name, spec in PEFT_SPECS.items():
        out[name] = make_peft_adapter(base, spec, root / name)
    return out


def trace(names: list[str]) -> list[tuple[int, list[int], str | None, int]]:
    """(arrival step, prompt, adapter, max_tokens): every adapter once, then a Zipf(1.0) tail
    over the same names and some base-model requests, 24 arrivals a step."""
    rng = random.Random(5)
    order = names[:]
    rng.shuffle(order)
    weights = [1.0 / (i + 1) for i in range(len(names))]
    order += rng.choices(names, weights=weights, k=400) + [None] * 40
    rng.shuffle(order)
    return [(i // 24, [rng.randrange(3, 128) for _ in range(rng.randint(3, 10))], name,
             rng.randint(2, 4)) for i, name in enumerate(order)]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def test_two_thousand_adapters_through_a_small_host_tier(tiny_model_dir, adapters):
    base, model_dir = tiny_model_dir(ARCH)
    engine = make_engine(model_dir, num_pages=512, max_resident_adapters=32, max_num_seqs=32,
                         max_batched_tokens=128, host_cache_bytes=HOST_CACHE_BYTES)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
        assert engine.host_cache.num_bytes <= HOST_CACHE_BYTES
    assert engine.pool.num_free_pages == engine.pool.num_pages  # registering costs no pages
    requests = trace(sorted(adapters))
    assert {a for _, _, a, _ in requests} >= set(adapters)
    tokens: dict[str, list[int]] = {}
    step = next_request = 0
    while next_request < len(requests) or engine.has_unfinished():
        while next_request < len(requests) and requests[next_request][0] <= step:
            _, prompt, name, n = requests[next_request]
            engine.add_request(prompt, greedy(n), name, f"r{next_request}")
            next_request += 1
        num_loads = engine.residency.num_loads
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                tokens[out.request_id] = out.token_ids
        assert engine.host_cache.num_bytes <= HOST_CACHE_BYTES, step
        assert engine.residency.num_loads - num_loads <= 8, step  # max_adapter_loads_per_step
        step += 1
    assert len(tokens) == len(requests)
    stats = engine.stats()
    assert stats.num_registered_adapters == 2000 and stats.device_adapter_loads >= 2000
    assert stats.host_prefetches > 0  # the worker read adapters ahead of admission
    assert_pool_clean(engine)
    engine.residency.evict_idle(engine.pool.num_pages)
    assert engine.pool.num_free_pages == engine.pool.num_pages
    engine.close()

    # Oracles on a sample: every DoRA/SHiRA request, 40 LoRA ones and 5 on the base model
    # against a separate engine serving each alone; the peft-made ones and a few LoRA ones
    # against PeftModel.generate too.
    rng = random.Random(9)
    lora_ids = [i for i, r in enumerate(requests) if r[2] and r[2].startswith("lora")]
    peft_ids = [i for i, r in enumerate(requests) if r[2] in PEFT_SPECS]
    base_ids = [i for i, r in enumerate(requests) if r[2] is None]
    sample = peft_ids + rng.sample(lora_ids, 40) + rng.sample(base_ids, 5)
    offline = make_engine(model_dir, prefetch=False)
    differs = 0
    for i in sample:
        _, prompt, name, n = requests[i]
        if name is not None and name not in offline.adapters:
            offline.add_adapter(name, adapters[name])
        [alone] = offline.generate([prompt], greedy(n), [name])
        assert tokens[f"r{i}"] == alone.token_ids, (i, name)
        [plain] = offline.generate([prompt], greedy(n), [None])
        differs += name is not None and plain.token_ids != alone.token_ids
    assert differs >= len(sample) // 3  # the adapters change the answers: parity means something
    for i in peft_ids + lora_ids[:3]:
        _, prompt, name, n = requests[i]
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapters[name])).eval()
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt]),
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=n, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        assert tokens[f"r{i}"] == out[0, len(prompt):].tolist(), (i, name)


def first_token_steps(engine, plan: dict[int, list[tuple[str, str]]],
                      num_steps: int) -> dict[str, tuple[int, int]]:
    """Request id → (arrival step, step of its first token), driving arrivals per step."""
    arrived, first = {}, {}
    for step in range(num_steps):
        for rid, adapter in plan.get(step, []):
            engine.add_request([7, 8, 9, 10], greedy(3), adapter, rid)
            arrived[rid] = step
        for out in engine.step():
            first.setdefault(out.request_id, (arrived[out.request_id], step))
    return first


@pytest.mark.parametrize("max_wait_steps", [6, 1000])
def test_resident_adapters_go_first_but_none_starves(tiny_model_dir, adapters, max_wait_steps):
    """One adapter slot, a steady stream on the resident adapter, one request on another: it is
    passed over for a while (resident first), then goes first after `max_wait_steps`."""
    engine = make_engine(tiny_model_dir(ARCH)[1], max_num_seqs=2, max_resident_adapters=1,
                         max_wait_steps=max_wait_steps, prefetch=False)
    hot, cold = "lora-0000", "lora-0001"
    engine.add_adapter(hot, adapters[hot])
    engine.add_adapter(cold, adapters[cold])
    plan = {step: [(f"hot-{step}", hot)] for step in range(40)}
    plan[0] += [("hot-0b", hot), ("cold", cold)]
    first = first_token_steps(engine, plan, 40)
    overtaken = [r for r, (a, s) in first.items() if r != "cold" and a > 0
                 and s < first.get("cold", (0, 40))[1]]
    assert overtaken  # later requests on the resident adapter went first
    if max_wait_steps == 6:
        arrival, start = first["cold"]
        # Aged at step 6; the hot requests holding the slot drain (3 steps each) before it runs.
        assert start - arrival <= max_wait_steps + 4, first["cold"]
    else:
        assert "cold" not in first  # without the age cap it would starve
