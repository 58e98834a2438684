"""Device prefetch: adapters of waiting requests are copied from the host tier into spare pool
pages ahead of admission, so the admitting step does no load; outputs do not change; running
work is never preempted or refused for it (KV evicts prefetched adapters first); the switch turns
it off. Plus the residency's rules for making room."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from loraplex.memory.kv import PageTable
from loraplex.model.config import ModelConfig
from loraplex.model.sampler import SamplingParams
from tests.adapter_factory import AdapterSpec, make_peft_adapter
from tests.conftest import TEST_DTYPE, assert_pool_clean, make_engine
from tests.memory.test_pool_and_residency import LAYOUT, lora, make, record
from tests.scheduler.test_many_adapters import write_random_lora

ARCH = "llama"
PROMPT = [5, 17, 33, 2, 90, 41, 7]
LORAS = {f"r{rank}-{i}": rank for i, rank in enumerate((1, 4, 8, 16, 8, 2, 1, 2, 1, 2))}
PEFT_SPECS = {
    "dora": AdapterSpec(kind="dora", r=8, alpha=16, target_modules=("q_proj", "v_proj",
                                                                     "down_proj"), seed=41),
    "shira": AdapterSpec(kind="shira", r=4, alpha=0, target_modules=("q_proj", "up_proj"),
                         seed=42),
}


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    base, model_dir = tiny_model_dir(ARCH)
    config = ModelConfig.from_dir(model_dir)
    root = tmp_path_factory.mktemp("device-prefetch")
    dirs = {name: write_random_lora(root / name, config, rank, ("q_proj", "v_proj", "up_proj"),
                                    seed=100 + i)
            for i, (name, rank) in enumerate(LORAS.items())}
    for name, spec in PEFT_SPECS.items():
        dirs[name] = make_peft_adapter(base, spec, root / name)
    offline = make_engine(model_dir, prefetch=False)
    for name, path in dirs.items():
        offline.add_adapter(name, path)
    return base, model_dir, dirs, offline


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def engine_with(model_dir, dirs, device_prefetch: bool = True, names=None, **kwargs):
    engine = make_engine(model_dir, device_prefetch=device_prefetch, **kwargs)
    for name in names or dirs:
        engine.add_adapter(name, dirs[name])
    return engine


def expected(offline, adapter: str | None, n: int, prompt=PROMPT) -> list[int]:
    """The request served alone (nothing waits: no prefetch can happen)."""
    return offline.generate([prompt], greedy(n), [adapter])[0].token_ids


def loads_at_admission(engine) -> int:
    return engine.residency.num_loads - engine.residency.num_prefetches


def run_to_end(engine, check_step=None) -> dict[str, list[int]]:
    tokens = {}
    while engine.has_unfinished():
        before = engine.stats()
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                tokens[out.request_id] = out.token_ids
        if check_step is not None:
            check_step(engine, before, engine.stats())
    return tokens


@pytest.mark.parametrize("device_prefetch", [True, False])
def test_a_waiting_request_finds_its_adapter_resident(setup, device_prefetch):
    _, model_dir, dirs, offline = setup
    engine = engine_with(model_dir, dirs, device_prefetch, max_num_seqs=1)
    assert engine.adapter_location("r8-2") == ("host", 0)  # registered into the host tier
    engine.add_request(PROMPT, greedy(8), None, "busy")  # holds the only sequence slot
    engine.add_request(PROMPT, greedy(5), "r8-2", "x")
    engine.step()
    stats = engine.stats()
    assert stats.num_running == 1 and stats.num_waiting == 1
    if device_prefetch:  # resident (unpinned) while its request still waits
        assert engine.adapter_location("r8-2") == ("device", 0)
        assert (stats.device_prefetches, stats.device_adapter_loads) == (1, 1)
        assert engine.residency.num_evictable_pages() == engine.pool.num_adapter_pages > 0
    else:
        assert engine.adapter_location("r8-2") == ("host", 0)
        assert (stats.device_prefetches, stats.device_adapter_loads) == (0, 0)
    admitted_at, loads = None, None
    while engine.has_unfinished():
        before = loads_at_admission(engine)
        outs = {out.request_id: out for out in engine.step()}
        if "x" in outs and admitted_at is None:  # its first token: the step that admitted it
            admitted_at, loads = engine.scheduler.num_steps, loads_at_admission(engine) - before
        if "x" in outs and outs["x"].finished:
            assert outs["x"].token_ids == expected(offline, "r8-2", 5)
    assert admitted_at is not None and loads == (0 if device_prefetch else 1)
    stats = engine.stats()
    assert stats.device_prefetch_hits == int(device_prefetch)
    assert stats.resident_adapter_admissions == int(device_prefetch)
    assert stats.device_prefetches_unused == 0 and stats.device_adapter_loads == 1
    assert_pool_clean(engine)
    engine.close()


def test_adapters_on_disk_are_left_to_the_host_tier(setup):
    """A prefetch never reads from disk on the engine thread: with no host tier, nothing is
    copied ahead and the adapter is read when its request is admitted."""
    _, model_dir, dirs, offline = setup
    engine = engine_with(model_dir, dirs, max_num_seqs=1, host_cache_bytes=0, prefetch=False)
    engine.add_request(PROMPT, greedy(4), None, "busy")
    engine.add_request(PROMPT, greedy(4), "r4-1", "x")
    engine.step()
    assert engine.adapter_location("r4-1") == ("disk", 0)
    assert engine.host_cache.num_blocking_reads == 0
    assert run_to_end(engine)["x"] == expected(offline, "r4-1", 4)
    stats = engine.stats()
    assert stats.device_prefetches == 0 and stats.host_blocking_reads == 1
    engine.close()


def mixed_requests() -> list[tuple[str, list[int], str | None, int]]:
    names = list(LORAS) + list(PEFT_SPECS) + [None]
    return [(f"q{i}", [(7 * i + 3 * k) % 120 + 3 for k in range(5 + i % 4)],
             names[i % len(names)], 4 + i % 3) for i in range(18)]


def test_outputs_do_not_change(setup):
    base, model_dir, dirs, offline = setup
    results, stats = {}, {}
    for device_prefetch in (True, False):
        engine = engine_with(model_dir, dirs, device_prefetch, max_num_seqs=2,
                             max_resident_adapters=4)
        for rid, prompt, adapter, n in mixed_requests():
            engine.add_request(prompt, greedy(n), adapter, rid)
        results[device_prefetch] = run_to_end(engine)
        stats[device_prefetch] = engine.stats()
        assert_pool_clean(engine)
        engine.close()
    assert stats[True].device_prefetch_hits >= 4  # most admissions found their adapter copied
    assert stats[False].device_prefetches == stats[False].device_prefetch_hits == 0
    assert results[True] == results[False]
    differs = 0
    for rid, prompt, adapter, n in mixed_requests():
        alone = expected(offline, adapter, n, prompt)
        assert results[True][rid] == alone, rid
        differs += adapter is not None and alone != expected(offline, None, n, prompt)
    assert differs >= 8  # the adapters change the answers: equality means something
    if TEST_DTYPE != "float32":
        return
    peft_made = [r for r in mixed_requests() if r[2] in PEFT_SPECS]
    assert {r[2] for r in peft_made} == set(PEFT_SPECS)
    for rid, prompt, adapter, n in peft_made:  # DoRA and SHiRA against PeftModel too
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[adapter])).eval()
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt]),
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=n, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        assert results[True][rid] == out[0, len(prompt):].tolist(), rid


def test_kv_evicts_prefetched_adapters_and_nothing_is_preempted(setup):
    """A pool just big enough for two running sequences at their longest with their adapters:
    spare pages early on take prefetched adapters; the running sequences' K/V takes them back."""
    _, model_dir, dirs, offline = setup
    names = ["r1-0", "r2-5", "r1-6", "r2-7", "r1-8", "r2-9"]  # 2 or 4 pages of 4 tokens
    requests = [(f"p{i}", names[i % len(names)], 24) for i in range(12)]
    results, evicted_for_kv = {}, []

    def check(engine, before, after) -> None:
        assert after.num_preemptions == 0  # never, not even for a step
        assert all(s.num_preemptions == 0 for s in engine.scheduler.waiting)
        # Prefetched adapters evicted in a step that loaded nothing at admission: KV took them
        # (a prefetch itself never evicts an adapter that a waiting request needs).
        if after.device_prefetches_unused > before.device_prefetches_unused and \
                after.device_adapter_loads - after.device_prefetches == \
                before.device_adapter_loads - before.device_prefetches:
            evicted_for_kv.append(after.num_kv_pages)

    for device_prefetch in (True, False):
        engine = engine_with(model_dir, dirs, device_prefetch, names, max_num_seqs=2,
                             page_size=4, num_pages=26)
        assert max(engine.adapters[n].num_pages for n in names) == 4
        assert 2 * (4 + engine.kv_layout.num_pages_for(len(PROMPT) + 24)) <= 26
        for rid, adapter, n in requests:
            engine.add_request(PROMPT, greedy(n), adapter, rid)
        results[device_prefetch] = run_to_end(engine, check_step=check)
        stats = engine.stats()
        assert stats.num_preemptions == 0
        assert_pool_clean(engine)
        engine.residency.evict_idle(engine.pool.num_pages)
        assert engine.pool.num_free_pages == engine.pool.num_pages
        engine.close()
        if device_prefetch:
            assert stats.device_prefetch_hits >= 2 and stats.device_prefetches_unused >= 1, stats
            assert evicted_for_kv, "no prefetched adapter gave its pages to K/V"
    assert results[True] == results[False]
    for rid, adapter, n in requests:
        assert results[True][rid] == expected(offline, adapter, n), rid


# ---- the residency's rules ------------------------------------------------------------------
def test_prefetch_takes_only_spare_room():
    pool, res = make(num_pages=40, num_slots=3)
    ws = [lora(8, seed=i) for i in range(5)]
    recs = [record(w, res, f"a{i}") for i, w in enumerate(ws)]
    pages = recs[0].num_pages
    res.acquire(recs[0], lambda: ws[0])  # running: pinned
    res.acquire(recs[1], lambda: ws[1])
    res.release(recs[1])                 # idle, but a waiting request needs it
    res.acquire(recs[2], lambda: ws[2])
    res.release(recs[2])                 # idle and cold
    kv = PageTable()
    kv.grow(pool, LAYOUT, LAYOUT.page_size * (40 - 3 * pages))  # the rest is KV: no free page
    assert pool.num_free_pages == 0
    keep = {recs[0].uid, recs[1].uid}
    before = (pool.usage(), res.num_resident, res.num_loads, res.num_evictions)
    # Room exists only by leaving KV short of its reserve: nothing changes.
    assert not res.prefetch(recs[3], lambda: ws[3], keep=keep, reserve_pages=1)
    assert (pool.usage(), res.num_resident, res.num_loads, res.num_evictions) == before
    # Evicting the cold idle adapter is allowed; the kept and the pinned ones stay.
    assert res.prefetch(recs[3], lambda: ws[3], keep=keep, reserve_pages=0)
    assert [res.is_resident(r) for r in recs[:4]] == [True, True, False, True]
    assert res.num_prefetches == 1 and res.num_evictable_pages() == 2 * pages  # a3 unpinned
    # Nothing is left that may go: no slot.
    assert not res.prefetch(recs[4], lambda: ws[4], keep=keep | {recs[3].uid}, reserve_pages=0)
    # KV pressure (the scheduler's `_grow`) evicts the prefetched adapter like any idle one.
    kv.release(pool)
    res.evict_idle(pool.num_free_pages + 2 * pages)
    assert not res.is_resident(recs[1]) and not res.is_resident(recs[3])
    assert res.num_prefetches_unused == 1 and res.is_resident(recs[0])
    # A prefetched adapter that is then acquired counts as a hit and loads nothing more.
    assert res.prefetch(recs[4], lambda: ws[4], keep=set(), reserve_pages=0)
    loads = res.num_loads
    slot = res.acquire(recs[4], lambda: pytest.fail("a prefetched adapter was loaded again"))
    assert res.num_loads == loads and res.num_prefetch_hits == res.num_resident_acquires == 1
    assert pool.usage() == {"kv": 0, "adapter": 2 * pages, "free": 40 - 2 * pages}
    flat, t = pool.tensor.view(-1), res.tables  # its rows are in the pages the table names
    mod = ws[4].modules[(1, "q_proj")]
    a_off = t.a_rows[1, 0, slot, 3].item()
    torch.testing.assert_close(flat[a_off:a_off + mod.a.shape[1]], mod.a[3])
