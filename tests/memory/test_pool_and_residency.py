"""The unified pool: counters, KV page tables, adapter rows in pages, LRU eviction, pins."""

from __future__ import annotations

import pytest
import torch

from loraplex.memory.adapters import AdapterResidency
from loraplex.memory.host_cache import AdapterRecord, HostCache
from loraplex.memory.kv import KVLayout, PageTable
from loraplex.memory.pool import OutOfPagesError, PagePool, PageUse
from loraplex.model.adapters.canonical import AdapterWeights, LoraModule, ShiraModule
from loraplex.model.config import TARGET_MODULES, ModelConfig

CONFIG = ModelConfig(model_type="llama", vocab_size=100, hidden_size=32, intermediate_size=48,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6,
                     rope_theta=1e4, max_position_embeddings=128, tie_word_embeddings=False,
                     attention_bias=False, mlp_bias=False, has_qk_norm=False)
LAYOUT = KVLayout(num_layers=2, page_size=8, num_kv_heads=2, head_dim=8)  # 512 elements a page


def lora(rank: int, modules=("q_proj", "down_proj"), dora: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for layer in range(CONFIG.num_layers):
        for m in modules:
            d_out, d_in = CONFIG.module_shape(m)
            mods[(layer, m)] = LoraModule(
                a=torch.randn(rank, d_in, generator=g), b_t=torch.randn(rank, d_out, generator=g),
                scale=0.5 + layer, row_scale=torch.rand(d_out, generator=g) if dora else None)
    return AdapterWeights(kind="dora" if dora else "lora", modules=mods, target_modules=modules)


def shira(nnz: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d_out, d_in = CONFIG.module_shape("up_proj")
    mod = ShiraModule(rows=torch.randint(0, d_out, (nnz,), generator=g, dtype=torch.int32),
                      cols=torch.randint(0, d_in, (nnz,), generator=g, dtype=torch.int32),
                      values=torch.randn(nnz, generator=g))
    return AdapterWeights(kind="shira", modules={(1, "up_proj"): mod}, target_modules=("up_proj",))


def record(weights: AdapterWeights, residency: AdapterResidency, name: str = "a") -> AdapterRecord:
    return AdapterRecord(name=name, path="", kind=weights.kind, max_rank=weights.max_rank,
                         num_bytes=weights.num_bytes, num_pages=residency.num_pages_for(weights),
                         target_modules=weights.target_modules)


def make(num_pages: int = 64, dtype=torch.float32, num_slots: int = 4):
    pool = PagePool(num_pages, LAYOUT.page_numel, dtype, torch.device("cpu"))
    return pool, AdapterResidency(pool, CONFIG, max_rank=16, num_slots=num_slots)


def test_pool_counters_and_refusal():
    pool = PagePool(10, 64, torch.float32, torch.device("cpu"))
    kv = pool.allocate(3, PageUse.KV)
    ad = pool.allocate(2, PageUse.ADAPTER)
    assert pool.usage() == {"kv": 3, "adapter": 2, "free": 5}
    with pytest.raises(OutOfPagesError):
        pool.allocate(6, PageUse.KV)
    assert pool.usage() == {"kv": 3, "adapter": 2, "free": 5}
    pool.free(kv + ad)
    assert pool.usage() == {"kv": 0, "adapter": 0, "free": 10}


def test_page_table_slots_follow_pages():
    pool = PagePool(10, LAYOUT.page_numel, torch.float32, torch.device("cpu"))
    pool.allocate(3, PageUse.KV)  # so the table's pages are not 0, 1, 2
    table = PageTable()
    table.grow(pool, LAYOUT, 20)
    assert len(table.pages) == 3
    slots = table.slots(LAYOUT, 6, 18).tolist()
    assert slots == [table.pages[i // 8] * 8 + i % 8 for i in range(6, 18)]
    table.release(pool)
    assert pool.num_kv_pages == 3


def test_page_table_row_follows_pages_as_they_grow_and_after_a_release():
    """`row()` (what a step's block tables are built from) is the page list as int32, after
    each growth (past its capacity too) and after a release and a regrowth (a preemption)."""
    pool = PagePool(200, LAYOUT.page_numel, torch.float32, torch.device("cpu"))
    pool.allocate(5, PageUse.KV)
    table = PageTable()
    assert table.row().tolist() == []
    for num_tokens in (1, 9, 17, 130, 131, 400, 1000):
        table.grow(pool, LAYOUT, num_tokens)
        assert table.row().dtype.name == "int32" and table.row().tolist() == table.pages
    table.release(pool)
    assert table.row().tolist() == []
    table.grow(pool, LAYOUT, 30)
    assert table.row().tolist() == table.pages and len(table.pages) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_in_pages_hold_the_adapter(dtype):
    pool, res = make(dtype=dtype)
    w = lora(7, dora=True)
    slot = res.acquire(record(w, res), lambda: w)
    flat = pool.tensor.view(-1)
    t = res.tables
    for (layer, name), mod in w.modules.items():
        m = TARGET_MODULES.index(name)
        d_out, d_in = CONFIG.module_shape(name)
        assert t.ranks[layer, m, slot] == 7
        for i in range(7):
            a_off, b_off = t.a_rows[layer, m, slot, i].item(), t.b_rows[layer, m, slot, i].item()
            torch.testing.assert_close(flat[a_off:a_off + d_in], mod.a[i].to(dtype))
            torch.testing.assert_close(flat[b_off:b_off + d_out], mod.b_t[i].to(dtype))
        g = t.g_rows[layer, m, slot].item()
        torch.testing.assert_close(flat[g:g + d_out], mod.row_scale.to(dtype))
        assert t.scales[layer, m, slot].item() == mod.scale
    untouched = TARGET_MODULES.index("k_proj")
    assert (t.ranks[:, untouched, slot] == 0).all()
    assert pool.num_adapter_pages == res.num_pages_for(w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shira_values_and_positions_in_pages(dtype):
    pool, res = make(dtype=dtype)
    w = shira(300)
    slot = res.acquire(record(w, res), lambda: w)
    mod = w.modules[(1, "up_proj")]
    d_out, d_in = CONFIG.module_shape("up_proj")
    width, m = d_in + d_out, TARGET_MODULES.index("up_proj")
    t, flat = res.tables, pool.tensor.view(-1)
    assert t.ranks[1, m, slot] == 300
    k = torch.arange(300)
    val = flat[t.a_rows[1, m, slot][k // width] + k % width]
    pos = flat.view(torch.int32)[t.b_rows[1, m, slot][k // width] + k % width]
    torch.testing.assert_close(val, mod.values.to(dtype))
    assert (pos.long() == mod.rows.long() * d_in + mod.cols.long()).all()


def test_lru_eviction_spares_pinned_and_recent():
    pool, res = make(num_pages=64, num_slots=3)
    ws = [lora(16, modules=TARGET_MODULES, seed=i) for i in range(4)]
    recs = [record(w, res, f"a{i}") for i, w in enumerate(ws)]
    pages = recs[0].num_pages
    assert 2 * pages < 64 < 4 * pages
    res.acquire(recs[0], lambda: ws[0])           # pinned throughout
    res.acquire(recs[1], lambda: ws[1])
    res.release(recs[1])                         # idle, least recently used
    assert res.can_acquire(recs[2])
    res.acquire(recs[2], lambda: ws[2])          # needs room: evicts a1, never a0
    assert res.is_resident(recs[0]) and not res.is_resident(recs[1])
    res.release(recs[2])
    with pytest.raises(OutOfPagesError):         # KV cannot take more than is free
        pool.allocate(pool.num_free_pages + 1, PageUse.KV)
    freed = res.evict_idle(pool.num_free_pages + 1)  # KV pressure evicts idle a2
    assert freed == pages and not res.is_resident(recs[2])
    assert res.num_evictable_pages() == 0 and res.is_resident(recs[0])


def test_drop_while_pinned_evicts_on_last_release():
    pool, res = make()
    w = lora(4)
    rec = record(w, res)
    res.acquire(rec, lambda: w)
    res.acquire(rec, lambda: w)
    res.drop(rec)
    assert res.is_resident(rec)
    res.release(rec)
    assert res.is_resident(rec)
    res.release(rec)
    assert not res.is_resident(rec) and pool.num_adapter_pages == 0


def test_host_cache_is_bounded_lru():
    loads = []

    def load(rec):
        loads.append(rec.name)
        return lora(4, seed=len(loads))

    one = lora(4).num_bytes
    cache = HostCache(2 * one, load)
    recs = [AdapterRecord(f"h{i}", "", "lora", 4, one, 1, ()) for i in range(3)]
    for r in recs:
        cache.get(r)
    assert recs[0] not in cache and recs[2] in cache and cache.num_bytes <= 2 * one
    cache.get(recs[2])
    assert (cache.num_hits, cache.num_misses, cache.num_evictions) == (1, 3, 1)
    assert loads == ["h0", "h1", "h2"]
