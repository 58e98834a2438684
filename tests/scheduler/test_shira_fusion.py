"""SHiRA's fused mode: a batch all on one SHiRA adapter runs with it scattered into the weights.

Oracles: `PeftModel.generate` for the tokens, the HF base model's own tensors for the weights
(restored bit for bit, and what DoRA's load-time norm reads while an adapter is fused).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from loraplex.model.sampler import SamplingParams
from tests.adapter_factory import AdapterSpec, make_peft_adapter
from tests.conftest import assert_pool_clean, make_engine

ARCH = "llama"
SPECS = {
    "shira": AdapterSpec(kind="shira", r=4, alpha=0,
                         target_modules=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
                         seed=41),
    "shira2": AdapterSpec(kind="shira", r=2, alpha=0, target_modules=("k_proj", "gate_proj"),
                          seed=42),
    "lora": AdapterSpec(kind="lora", r=8, alpha=16, target_modules=("q_proj", "v_proj"), seed=43),
    "dora": AdapterSpec(kind="dora", r=4, alpha=8, target_modules=("q_proj", "down_proj"),
                        seed=44),
}
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    base, model_dir = tiny_model_dir(ARCH)
    dirs = {n: make_peft_adapter(base, s, tmp_path_factory.mktemp(n)) for n, s in SPECS.items()}
    models = {None: copy.deepcopy(base).eval()}
    for name, path in dirs.items():
        models[name] = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()

    def expected(adapter: str | None, prompt_ids: list[int]) -> list[int]:
        with torch.no_grad():
            out = models[adapter].generate(
                input_ids=torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt_ids):].tolist()

    return base, model_dir, dirs, expected


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(0, 128, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


def weights_of(engine) -> list[torch.Tensor]:
    return [t.detach().cpu().clone() for layer in engine.model.layers
            for t in layer.values() if t is not None]


def run(engine, requests: list[tuple[list[int], str | None]], join_after: int = 0,
        late: list[tuple[list[int], str | None]] = ()) -> dict[str, list[int]]:
    """Greedy generation; `late` requests are added after `join_after` steps."""
    ids = [engine.add_request(p, greedy(), a) for p, a in requests]
    late_ids: list[str] = []
    tokens: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished() or (late and not late_ids):
        if steps == join_after and late and not late_ids:
            late_ids = [engine.add_request(p, greedy(), a) for p, a in late]
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.token_ids
        steps += 1
    return {i: tokens[i] for i in ids + late_ids}


def test_whole_shira_batches_fuse_and_the_weights_come_back_exactly(setup):
    _, model_dir, dirs, expected = setup
    engine = make_engine(model_dir)
    for name in ("shira", "shira2", "lora"):
        engine.add_adapter(name, dirs[name])
    pristine = weights_of(engine)
    requests = [(prompt(1, 7), "shira"), (prompt(2, 12), "shira")]
    got = run(engine, requests)
    assert engine.runner.shira.num_merges == 1  # fused once, kept across the decode steps
    assert engine.runner.shira.active is not None
    assert any(not torch.equal(a, b) for a, b in zip(weights_of(engine), pristine))
    for (p, a), tokens in zip(requests, got.values()):
        assert tokens == expected(a, p)
    # Another SHiRA adapter takes its place, then base requests restore the weights.
    requests = [(prompt(3, 5), "shira2"), (prompt(4, 9), "shira2")]
    for (p, a), tokens in zip(requests, run(engine, requests).values()):
        assert tokens == expected(a, p)
    assert engine.runner.shira.num_merges == 2
    [(base_tokens)] = run(engine, [(prompt(5, 6), None)]).values()
    assert base_tokens == expected(None, prompt(5, 6))
    assert engine.runner.shira.active is None
    assert all(torch.equal(a, b) for a, b in zip(weights_of(engine), pristine))
    assert_pool_clean(engine)


def test_a_mixed_batch_unfuses_and_every_request_stays_exact(setup):
    _, model_dir, dirs, expected = setup
    engine = make_engine(model_dir)
    for name in ("shira", "lora"):
        engine.add_adapter(name, dirs[name])
    first = [(prompt(6, 10), "shira"), (prompt(7, 4), "shira")]
    late = [(prompt(8, 8), "lora"), (prompt(9, 5), None), (prompt(10, 6), "shira")]
    got = run(engine, first, join_after=2, late=late)
    assert engine.runner.shira.num_merges >= 1
    for (p, a), tokens in zip(first + late, got.values()):
        assert tokens == expected(a, p), a
    assert_pool_clean(engine)


def test_fusion_off_runs_the_gather_path_with_equal_tokens(setup):
    _, model_dir, dirs, expected = setup
    engine = make_engine(model_dir)
    engine.config = copy.copy(engine.config)
    object.__setattr__(engine.config, "shira_fusion", False)
    engine.add_adapter("shira", dirs["shira"])
    requests = [(prompt(11, 9), "shira"), (prompt(12, 3), "shira")]
    for (p, a), tokens in zip(requests, run(engine, requests).values()):
        assert tokens == expected(a, p)
    assert engine.runner.shira.num_merges == 0


def test_dora_loaded_while_fused_reads_the_original_weights(setup):
    base, model_dir, dirs, expected = setup
    engine = make_engine(model_dir)
    engine.add_adapter("shira", dirs["shira"])
    ids = [engine.add_request(prompt(13, 11), greedy(), "shira") for _ in range(2)]
    engine.step()  # the prefill: fused from here on
    assert engine.runner.shira.active is not None
    hf = base.model.layers[0]
    fused = engine.model.base_weight(0, "q_proj")
    assert not torch.equal(fused.cpu(), hf.self_attn.q_proj.weight.detach())
    for module, hf_weight in (("q_proj", hf.self_attn.q_proj.weight),
                              ("down_proj", hf.mlp.down_proj.weight)):
        assert torch.equal(engine._base_weight(0, module).cpu(), hf_weight.detach().to(
            fused.dtype))
    engine.add_adapter("dora", dirs["dora"])  # its norm is computed now, while fused
    dora_prompt = prompt(14, 7)
    dora_id = engine.add_request(dora_prompt, greedy(), "dora")
    tokens = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.token_ids
    assert tokens[dora_id] == expected("dora", dora_prompt)
    assert all(tokens[i] == expected("shira", prompt(13, 11)) for i in ids)
    assert_pool_clean(engine)
