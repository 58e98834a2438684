"""Engine vs transformers + peft on tiny random models: logits (fp32, 1e-4) and greedy tokens."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import pytest
import torch
from peft import PeftModel

from loraplex.model.sampler import SamplingParams
from loraplex.scheduler.batch import StepOutput
from tests.adapter_factory import AdapterSpec, make_peft_adapter
from tests.conftest import ARCHS, TEST_DEVICE, TEST_DTYPE, assert_pool_clean, make_engine

BF16_RTOL = 2e-2
"""bf16 runs (on a GPU) are judged by relative error of the logits, as the issue says."""

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterCase:
    name: str
    spec: AdapterSpec | None  # None: the base model alone
    atol: float = 1e-4


CASES = [
    AdapterCase("base", None),
    AdapterCase("lora-r1", AdapterSpec(kind="lora", r=1, alpha=2, target_modules=ALL, seed=1)),
    AdapterCase("lora-r8", AdapterSpec(kind="lora", r=8, alpha=16,
                                       target_modules=("q_proj", "v_proj"), seed=2)),
    AdapterCase("lora-r64", AdapterSpec(kind="lora", r=64, alpha=32, target_modules=ALL, seed=3)),
    AdapterCase("rslora", AdapterSpec(kind="rslora", r=16, alpha=8, target_modules=ALL, seed=4)),
    AdapterCase("pattern", AdapterSpec(kind="pattern", r=8, alpha=16, target_modules=ALL, seed=5)),
    AdapterCase("dora", AdapterSpec(kind="dora", r=8, alpha=16, target_modules=ALL, seed=6)),
    AdapterCase("shira", AdapterSpec(kind="shira", r=4, alpha=0,
                                     target_modules=("q_proj", "o_proj", "up_proj"), seed=7)),
]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """(arch, case name) → adapter folder, built with peft on that arch's base model."""
    cache = {}

    def get(arch: str, case: AdapterCase):
        key = (arch, case.name)
        if key not in cache:
            base, _ = tiny_model_dir(arch)
            cache[key] = make_peft_adapter(base, case.spec, tmp_path_factory.mktemp(case.name))
        return cache[key]

    return get


def oracle(tiny_model_dir, arch: str, adapter_dir) -> torch.nn.Module:
    base, _ = tiny_model_dir(arch)
    model = copy.deepcopy(base)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


def run_with_all_logits(engine, requests: list[tuple[list[int], str | None]], max_tokens: int):
    """Greedy generation through the engine's own scheduler and runner, keeping every row of
    logits it computes: returns per request (all tokens, {position: logits row})."""
    ids = [engine.add_request(p, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                ignore_eos=True), a) for p, a in requests]
    seqs = {engine._seqs[i].seq_id: engine._seqs[i] for i in ids}
    rows: dict[int, dict[int, torch.Tensor]] = {s: {} for s in seqs}
    while engine.has_unfinished():
        batch = engine.scheduler.schedule()
        logits = engine.runner.run(
            dataclasses.replace(batch, logits_indices=torch.arange(batch.num_tokens)))
        starts = batch.query_start_loc.tolist()
        for b, seq_id in enumerate(batch.seq_ids):
            first_pos = batch.context_lens[b].item() - (starts[b + 1] - starts[b])
            for j in range(starts[b], starts[b + 1]):
                rows[seq_id][first_pos + j - starts[b]] = logits[j].float().cpu()
        tokens = logits[batch.logits_indices].argmax(-1).tolist()
        engine.scheduler.update(batch, StepOutput(tokens, None, None))
    return [(list(seqs[s].request.prompt_ids) + seqs[s].output_ids, rows[s]) for s in seqs]


def prompt(seed: int, length: int, vocab: int = 128) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_logits_match_peft(arch, case, tiny_model_dir, adapters):
    _, model_dir = tiny_model_dir(arch)
    adapter_dir = adapters(arch, case) if case.spec else None
    engine = make_engine(model_dir)
    name = None
    if adapter_dir is not None:
        name = case.name
        engine.add_adapter(name, adapter_dir)
    [(tokens, rows)] = run_with_all_logits(engine, [(prompt(11, 9), name)], max_tokens=4)
    with torch.no_grad():
        ref = oracle(tiny_model_dir, arch, adapter_dir)(torch.tensor([tokens])).logits[0]
        if adapter_dir is not None:  # the adapter must matter far more than the tolerance
            base = oracle(tiny_model_dir, arch, None)(torch.tensor([tokens])).logits[0]
            assert (ref - base).abs().max() > 100 * case.atol
    assert sorted(rows) == list(range(len(tokens) - 1))  # every prefill and decode position
    ours = torch.stack([rows[p] for p in sorted(rows)])
    ref = ref[: ours.shape[0]]
    assert_pool_clean(engine)
    if TEST_DTYPE != "float32":
        # Issue 2's bar is 2e-2; where transformers' own model in this dtype misses it too
        # (tiny random qwen3 with rank 1: 2.8e-2 on an H100), we ask to be as close as it is.
        rel = ((ours - ref).norm() / ref.norm()).item()
        low = oracle(tiny_model_dir, arch, adapter_dir).to(TEST_DEVICE, getattr(torch, TEST_DTYPE))
        with torch.no_grad():
            theirs = low(torch.tensor([tokens], device=TEST_DEVICE)).logits[0].float().cpu()
        floor = ((theirs[: ours.shape[0]] - ref).norm() / ref.norm()).item()
        assert rel <= max(BF16_RTOL, 1.25 * floor), \
            f"{arch}/{case.name}: relative error {rel:.2e} (transformers in {TEST_DTYPE}: {floor:.2e})"
        return
    err = (ours - ref).abs().max().item()
    assert err <= case.atol, f"{arch}/{case.name}: max abs error {err:.2e}"
