"""Request and adapter lifecycle in the engine: refusal, abort, removal and hot-swap mid-flight."""

from __future__ import annotations

import pytest

from loraplex.model.sampler import SamplingParams
from loraplex.scheduler.errors import RequestError, RequestTooLongError, UnknownAdapterError
from tests.adapter_factory import AdapterSpec, make_peft_adapter
from tests.conftest import assert_pool_clean, make_engine

ARCH = "mistral"
V1 = AdapterSpec(kind="lora", r=8, alpha=16, target_modules=("q_proj", "v_proj"), seed=51)
V2 = AdapterSpec(kind="dora", r=4, alpha=8, target_modules=("q_proj", "up_proj"), seed=52)
PROMPT = [3, 14, 15, 92, 65, 35]


def greedy(n: int = 6) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def dirs(tiny_model_dir, tmp_path_factory):
    base, model_dir = tiny_model_dir(ARCH)
    return (model_dir, make_peft_adapter(base, V1, tmp_path_factory.mktemp("v1")),
            make_peft_adapter(base, V2, tmp_path_factory.mktemp("v2")))


def alone(model_dir, adapter_dir, n: int = 6) -> list[int]:
    engine = make_engine(model_dir)
    engine.add_adapter("x", adapter_dir)
    return engine.generate([PROMPT], greedy(n), ["x"])[0].token_ids


def run_until_done(engine, request_ids: set[str]) -> dict[str, object]:
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished and out.request_id in request_ids:
                done[out.request_id] = out
    return done


def test_requests_that_can_never_fit_are_refused(dirs):
    engine = make_engine(dirs[0], num_pages=8)  # 8 pages of 16 tokens
    with pytest.raises(RequestTooLongError, match="pages"):
        engine.add_request(list(range(100)), SamplingParams(max_tokens=100))
    with pytest.raises(RequestTooLongError, match="context"):
        engine.add_request([1, 2], SamplingParams(max_tokens=10_000))
    with pytest.raises(RequestError):
        engine.add_request([], greedy())
    with pytest.raises(RequestError):
        engine.add_request([1, 10_000], greedy())
    assert not engine.has_unfinished()
    [out] = engine.generate([PROMPT], greedy())  # still serving
    assert len(out.token_ids) == 6


def test_abort_frees_everything_and_others_continue(dirs):
    model_dir, v1, _ = dirs
    engine = make_engine(model_dir)
    engine.add_adapter("x", v1)
    keep = engine.add_request(PROMPT, greedy(), "x")
    drop = engine.add_request(PROMPT * 3, greedy(50), "x")
    engine.step()
    engine.step()
    aborted = engine.abort(drop)
    assert aborted.finished and aborted.finish_reason == "abort"
    done = run_until_done(engine, {keep})
    assert done[keep].token_ids == alone(model_dir, v1)
    assert_pool_clean(engine)


def test_remove_adapter_lets_running_finish_and_refuses_new(dirs):
    model_dir, v1, _ = dirs
    engine = make_engine(model_dir)
    engine.add_adapter("x", v1)
    running = engine.add_request(PROMPT, greedy(), "x")
    engine.step()
    engine.remove_adapter("x")
    with pytest.raises(UnknownAdapterError):
        engine.add_request(PROMPT, greedy(), "x")
    done = run_until_done(engine, {running})
    assert done[running].token_ids == alone(model_dir, v1)
    assert engine.pool.num_adapter_pages == 0  # the removed version left the pool at its end
    assert_pool_clean(engine)


def test_hot_swap_running_finish_on_old_new_get_new(dirs):
    model_dir, v1, v2 = dirs
    engine = make_engine(model_dir)
    engine.add_adapter("x", v1)
    old = engine.add_request(PROMPT, greedy(), "x")
    engine.step()
    record = engine.add_adapter("x", v2)
    assert record.version == 2 and record.kind == "dora"
    new = engine.add_request(PROMPT, greedy(), "x")
    done = run_until_done(engine, {old, new})
    assert done[old].token_ids == alone(model_dir, v1)
    assert done[new].token_ids == alone(model_dir, v2)
    assert done[old].token_ids != done[new].token_ids
    assert_pool_clean(engine)
