"""Fairness between tenants: a flooding tenant cannot push a quiet one's latency (in engine
steps) far past what it gets alone; weights split the service. Latency is counted in steps."""

from __future__ import annotations

import torch

from loraplex.model.sampler import SamplingParams
from tests.conftest import assert_pool_clean, make_engine

ARCH = "llama"
NUM_ARRIVAL_STEPS = 80
MAX_TOKENS = 8
NUM_BACKLOG = 150


def greedy(n: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def prompt(i: int) -> list[int]:
    g = torch.Generator().manual_seed(i)
    return torch.randint(3, 128, (6 + i % 5,), generator=g).tolist()


def arrivals(with_flood: bool) -> dict[int, list[tuple[str, str]]]:
    """step → [(request id, tenant)]: the quiet tenant sends one request every 10 steps, the
    flood 10 times as many (one a step)."""
    plan: dict[int, list[tuple[str, str]]] = {}
    for step in range(NUM_ARRIVAL_STEPS):
        if with_flood:
            plan.setdefault(step, []).append((f"flood-{step}", "flood"))
        if step % 10 == 3:
            plan.setdefault(step, []).append((f"quiet-{step}", "quiet"))
    return plan


def quiet_latencies(model_dir, with_flood: bool, fairness: bool = True) -> dict[str, int]:
    """Quiet request id → steps from its arrival to its last token."""
    # 4 sequences at once: the flood (one a step, 8 steps each) needs 8, so it queues up.
    engine = make_engine(model_dir, max_num_seqs=4, max_batched_tokens=64, fairness=fairness)
    plan = arrivals(with_flood)
    arrived: dict[str, int] = {}
    latency: dict[str, int] = {}
    num_quiet = sum(1 for reqs in plan.values() for _, t in reqs if t == "quiet")
    step = 0
    while len(latency) < num_quiet:
        for rid, tenant in plan.get(step, []):
            engine.add_request(prompt(step), greedy(), None, rid, tenant)
            arrived[rid] = step
        for out in engine.step():
            if out.finished and out.request_id.startswith("quiet"):
                assert out.finish_reason == "length"
                latency[out.request_id] = step + 1 - arrived[out.request_id]
        step += 1
    for rid in arrived:  # the flood's backlog: not needed any more
        engine.abort(rid)
    assert_pool_clean(engine)
    return latency


def p99(values: list[int]) -> float:
    return torch.quantile(torch.tensor(values, dtype=torch.float64), 0.99).item()


def test_quiet_tenant_keeps_its_latency_under_a_flood(tiny_model_dir):
    model_dir = tiny_model_dir(ARCH)[1]
    alone = p99(list(quiet_latencies(model_dir, with_flood=False).values()))
    assert alone >= MAX_TOKENS  # one step a token: the latency is real work, not zero
    fair = p99(list(quiet_latencies(model_dir, with_flood=True).values()))
    assert fair <= 2 * alone, (fair, alone)
    # The same flood with fairness switched off (one FIFO queue): the quiet tenant waits behind
    # the flood's backlog, so the bound above is not met by accident.
    unfair = p99(list(quiet_latencies(model_dir, with_flood=True, fairness=False).values()))
    assert unfair > 2 * alone, (unfair, alone)


def test_weights_split_the_service(tiny_model_dir):
    """Two tenants both backlogged, weights 3:1: computed tokens split about 3:1."""
    engine = make_engine(tiny_model_dir(ARCH)[1], max_num_seqs=4, max_batched_tokens=64)
    engine.set_tenant_weight("gold", 3.0)
    engine.set_tenant_weight("bronze", 1.0)
    for i in range(NUM_BACKLOG):  # far more than 4 slots can serve in the window below
        for tenant in ("gold", "bronze"):  # lengths vary, so slots free up one by one
            engine.add_request(prompt(i), greedy(4 + i % 9), None, f"{tenant}-{i}", tenant)
    tokens = {"gold": 0, "bronze": 0}  # computed: prompt (at the first token) plus output
    for _ in range(240):
        for out in engine.step():
            first = len(out.token_ids) == len(out.new_token_ids)
            tokens[out.request_id.split("-")[0]] += len(out.new_token_ids) + \
                first * out.num_prompt_tokens
    ratio = tokens["gold"] / tokens["bronze"]
    assert 2.4 <= ratio <= 3.6, tokens
    for i in range(NUM_BACKLOG):
        for tenant in ("gold", "bronze"):
            engine.abort(f"{tenant}-{i}")
    assert_pool_clean(engine)
