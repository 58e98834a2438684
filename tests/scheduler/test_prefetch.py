"""Prefetch: the worker reads adapters of waiting requests into the host tier ahead of admission,
admission never waits on those reads while other work can run, and outputs do not change. Plus
the host tier under two threads: one read per adapter, never above its bound."""

from __future__ import annotations

import threading

import pytest
import torch

from loraplex.memory.host_cache import AdapterRecord, HostCache
from loraplex.model.adapters.canonical import AdapterWeights, LoraModule
from loraplex.model.config import ModelConfig
from loraplex.model.sampler import SamplingParams
from tests.conftest import assert_pool_clean, make_engine
from tests.scheduler.test_many_adapters import write_random_lora

ARCH = "mistral"
NUM_ADAPTERS = 12
NUM_CACHED = 6  # the host tier holds 6 of the 12 (all the same size): a0..a5 stay in RAM
PROMPT = [5, 17, 33, 2, 90, 41, 7]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    _, model_dir = tiny_model_dir(ARCH)
    config = ModelConfig.from_dir(model_dir)
    root = tmp_path_factory.mktemp("prefetch")
    dirs = {f"a{i}": write_random_lora(root / f"a{i}", config, 8, ("q_proj", "v_proj"), seed=i)
            for i in range(NUM_ADAPTERS)}
    offline = make_engine(model_dir, prefetch=False)
    for name, path in dirs.items():
        offline.add_adapter(name, path)
    return model_dir, dirs, offline


def greedy(n: int = 6) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def engine_with_small_host_tier(model_dir, dirs, **kwargs):
    probe = make_engine(model_dir, prefetch=False)
    one = probe.add_adapter("probe", dirs["a0"]).num_bytes
    engine = make_engine(model_dir, host_cache_bytes=NUM_CACHED * one, **kwargs)
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    assert [engine.adapter_location(n)[0] for n in dirs] == \
        ["host"] * NUM_CACHED + ["disk"] * (NUM_ADAPTERS - NUM_CACHED)
    return engine


def run_to_end(engine) -> dict[str, list[int]]:
    tokens = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None
            if out.finished:
                tokens[out.request_id] = out.token_ids
    return tokens


def expected(offline, adapter: str | None, n: int = 6) -> list[int]:
    return offline.generate([PROMPT], greedy(n), [adapter])[0].token_ids


def test_prefetch_fills_the_host_tier_ahead_of_admission(setup):
    model_dir, dirs, offline = setup
    engine = engine_with_small_host_tier(model_dir, dirs, max_num_seqs=1)
    engine.add_request(PROMPT, greedy(30), None, "busy")  # holds the only slot for 30 steps
    engine.add_request(PROMPT, greedy(), "a6", "x6")
    engine.add_request(PROMPT, greedy(), "a7", "x7")
    engine.step()
    assert engine.prefetcher.wait_idle(timeout_s=60)
    # Both adapters are in RAM while their requests still wait; the engine thread read nothing.
    assert engine.adapter_location("a6") == ("host", 0)
    assert engine.adapter_location("a7") == ("host", 0)
    stats = engine.stats()
    assert stats.num_waiting == 2 and stats.host_prefetches == 2
    assert stats.host_blocking_reads == 0
    tokens = run_to_end(engine)
    # Loads report where the adapter was when needed (read from disk for them, ahead of time),
    # while no read happened on the engine thread.
    loads = {load.adapter: load.source for load in engine.stats().adapter_loads}
    assert loads == {"a6": "disk", "a7": "disk"}
    assert tokens["x6"] == expected(offline, "a6") and tokens["x7"] == expected(offline, "a7")
    assert tokens["busy"] == expected(offline, None, 30)
    # Two host-tier misses (read from disk for these loads), none of them on the engine thread.
    assert engine.host_cache.num_misses == 2 and engine.host_cache.num_blocking_reads == 0
    assert_pool_clean(engine)
    engine.close()


def test_admission_is_not_blocked_by_disk_reads(setup):
    model_dir, dirs, offline = setup
    engine = engine_with_small_host_tier(model_dir, dirs)
    engine.add_request(PROMPT, greedy(20), None, "busy")
    engine.step()
    # On disk, in RAM, and the base model: the one on disk must not hold up the others.
    for rid, adapter in (("disk", "a9"), ("host", "a1"), ("base", None)):
        engine.add_request(PROMPT, greedy(), adapter, rid)
    outs = {out.request_id: out for out in engine.step()}
    assert outs["host"].new_token_ids and outs["base"].new_token_ids
    assert engine.host_cache.num_blocking_reads == 0  # no read from disk on the engine thread
    assert engine.prefetcher.wait_idle(timeout_s=60)
    tokens = run_to_end(engine)
    assert engine.host_cache.num_blocking_reads == 0 and engine.stats().host_prefetches >= 1
    for rid, adapter in (("disk", "a9"), ("host", "a1"), ("base", None)):
        assert tokens[rid] == expected(offline, adapter), rid
    assert_pool_clean(engine)
    engine.close()


def test_a_step_with_nothing_else_to_run_reads_at_once(setup):
    model_dir, dirs, offline = setup
    engine = engine_with_small_host_tier(model_dir, dirs)
    engine.add_request(PROMPT, greedy(), "a10", "only")
    [out] = engine.step()  # no idle step waiting for the worker: the first token comes now
    assert out.new_token_ids == expected(offline, "a10")[:1]
    cache = engine.host_cache
    assert cache.num_blocking_reads + cache.num_prefetches == 1 == cache.num_misses  # read once
    assert run_to_end(engine)["only"] == expected(offline, "a10")
    engine.close()


# ---- the host tier under two threads --------------------------------------------------------
def weights(seed: int) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    module = LoraModule(a=torch.randn(4, 32, generator=g), b_t=torch.randn(4, 32, generator=g),
                        scale=1.0)
    return AdapterWeights(kind="lora", modules={(0, "q_proj"): module}, target_modules=("q_proj",))


def records(n: int) -> list[AdapterRecord]:
    one = weights(0).num_bytes
    return [AdapterRecord(f"h{i}", "", "lora", 4, one, 1, ("q_proj",)) for i in range(n)]


def test_concurrent_misses_read_once_and_dropped_reads_are_not_kept():
    entered, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow_load(record: AdapterRecord) -> AdapterWeights:
        calls.append(record.name)
        entered.set()
        release.wait(timeout=60)
        return weights(int(record.name[1:]))

    recs = records(2)
    cache = HostCache(10 * recs[0].num_bytes, slow_load)
    got: list[AdapterWeights] = []
    first = threading.Thread(target=lambda: got.append(cache.get(recs[0])))
    first.start()
    assert entered.wait(timeout=60)
    second = threading.Thread(target=lambda: got.append(cache.get(recs[0])))
    second.start()
    release.set()
    first.join()
    second.join()
    assert calls == ["h0"] and got[0] is got[1] and recs[0] in cache

    entered.clear()
    release.clear()
    reader = threading.Thread(target=cache.fetch, args=(recs[1],))
    reader.start()
    assert entered.wait(timeout=60)
    cache.drop(recs[1])  # deleted while being read: the read must not land in the cache
    release.set()
    reader.join()
    assert recs[1] not in cache and cache.num_bytes == recs[0].num_bytes


def test_host_tier_stays_in_bounds_under_two_threads():
    recs = records(40)
    cache = HostCache(5 * recs[0].num_bytes, lambda r: weights(int(r.name[1:])))
    over: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if cache.num_bytes > cache.capacity_bytes:
                over.append(cache.num_bytes)

    def hammer(offset: int) -> None:
        for i in range(150):
            record = recs[(i * 7 + offset) % len(recs)]
            (cache.fetch if i % 2 else cache.get)(record)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(3)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert not over
    assert cache.num_bytes == sum(r.num_bytes for r in recs if r in cache) <= 5 * recs[0].num_bytes


def test_stats_snapshots_have_no_side_effects(setup) -> None:
    """Two readers of `Engine.stats()` see the same numbered loads; nothing is handed out."""
    model_dir, dirs, _ = setup
    engine = make_engine(model_dir, prefetch=False)
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    engine.generate([PROMPT] * 2, greedy(2), ["a1", "a2"])
    first, second = engine.stats(), engine.stats()
    assert first.adapter_loads == second.adapter_loads
    assert [load.number for load in first.adapter_loads] == list(
        range(1, first.num_adapter_loads + 1))
    assert {load.adapter for load in first.adapter_loads} == {"a1", "a2"}
