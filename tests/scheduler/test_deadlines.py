"""Deadlines (S-LoRA's early abort): a waiting request that can no longer get its first token in
time is aborted, and nothing else is. Time is virtual: the engine's clock advances 1 s a step."""

from __future__ import annotations

import math

import pytest
import torch

from loraplex.model.sampler import SamplingParams
from loraplex.scheduler.errors import DeadlineExceededError, RequestError
from tests.conftest import assert_pool_clean, make_engine

ARCH = "qwen2"
STEP_S = 1.0
BUDGET = 16  # tokens a step: a 40-token prompt needs 3 steps of prefill
MAX_TOKENS = 5


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


def prompt(i: int) -> list[int]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randint(3, 128, (40 if i % 7 == 3 else 8,), generator=g).tolist()


# (arrival step, tenant, deadline_s or None): tight ones, generous ones, none, tenant defaults.
PLAN = [(step, tenant, deadline)
        for step in range(0, 24, 2)
        for tenant, deadline in (("a", 3.5), ("a", None), ("b", 2.0), ("b", 500.0),
                                 ("slo", None))]


def test_deadlines_abort_what_cannot_make_it_and_nothing_else(tiny_model_dir):
    model_dir = tiny_model_dir(ARCH)[1]
    clock = VirtualClock()
    engine = make_engine(model_dir, max_num_seqs=3, max_batched_tokens=BUDGET, clock=clock)
    engine.set_tenant_deadline("slo", 4.0)  # tenant default; "b" gives its own per request
    info: dict[str, tuple[int, float | None, list[int]]] = {}
    first_token_s: dict[str, float] = {}
    done: dict[str, object] = {}
    step = 0
    while step < 30 or engine.has_unfinished():
        for i, (arrive, tenant, deadline) in enumerate(PLAN):
            if arrive == step:
                rid = f"{tenant}-{i}"
                engine.add_request(prompt(i), greedy(), None, rid, tenant, deadline_s=deadline)
                info[rid] = (step, 4.0 if tenant == "slo" else deadline, prompt(i))
        for out in engine.step():
            if out.new_token_ids and out.request_id not in first_token_s:
                first_token_s[out.request_id] = clock.now + STEP_S  # the step ends then
            if out.finished:
                done[out.request_id] = (out, clock.now)
        clock.now += STEP_S
        step += 1

    aborted = {rid for rid, (out, _) in done.items() if out.finish_reason == "deadline"}
    for rid in aborted:
        out, at = done[rid]
        arrive, deadline, p = info[rid]
        assert isinstance(out.error, DeadlineExceededError) and not out.token_ids
        # It truly could not make it: even admitted at `at`, its prefill ends too late.
        assert at + math.ceil(len(p) / BUDGET) * STEP_S > arrive + deadline, rid
    served = set(done) - aborted
    for rid in served:
        arrive, deadline, _ = info[rid]
        assert done[rid][0].finish_reason == "length"  # running ones are never cut short
        if deadline is not None:
            assert first_token_s[rid] <= arrive + deadline, rid  # none that missed got through
    # Not vacuous: tight deadlines both met and missed, some aborted before their deadline
    # (from the step-rate estimate), and every request without a tight deadline served.
    tight = {rid for rid, (_, d, _) in info.items() if d is not None and d < 10}
    assert aborted and tight & served and aborted <= tight
    assert any(done[r][1] < info[r][0] + info[r][1] for r in aborted)
    assert {rid for rid in info if rid not in tight} <= served
    assert any(rid.startswith("slo") for rid in aborted)  # the tenant default applies
    assert engine.stats().num_early_aborts == len(aborted)

    offline = make_engine(model_dir)  # no deadlines, one request at a time
    for rid in served:
        [alone] = offline.generate([info[rid][2]], greedy())
        assert done[rid][0].token_ids == alone.token_ids, rid
    assert_pool_clean(engine)


def test_bad_deadlines_and_weights_are_refused(tiny_model_dir):
    engine = make_engine(tiny_model_dir(ARCH)[1])
    for bad in (0, -1.0, float("nan"), float("inf"), True, "5"):
        with pytest.raises(RequestError, match="deadline_s"):
            engine.add_request([5, 6, 7], greedy(), deadline_s=bad)
        with pytest.raises(RequestError, match="deadline_s"):
            engine.set_tenant_deadline("t", bad)
    for bad in (0, -2.0, float("nan")):
        with pytest.raises(ValueError, match="weight"):
            engine.set_tenant_weight("t", bad)
    assert not engine.has_unfinished()
