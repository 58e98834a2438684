"""Shared fixtures: tiny random-weight models saved as HF folders, and engines over them."""

from __future__ import annotations

import os

import pytest
import torch

from loraplex.memory.config import MemoryConfig
from loraplex.scheduler.config import SchedulerConfig
from loraplex.scheduler.engine import Engine, EngineConfig
from tests.adapter_factory import make_hf_model, save_hf_model

# Tiny models: one intra-op thread is much faster than several fighting over two cores.
torch.set_num_threads(1)

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
TEST_DEVICE = os.environ.get("LORAPLEX_TEST_DEVICE", "cpu")
"""Where engine tests run their engine (`cuda` on a GPU machine; the oracles stay on the CPU)."""
TEST_DTYPE = os.environ.get("LORAPLEX_TEST_DTYPE", "float32")
TEST_GRAPHS_PREFILL = os.environ.get("LORAPLEX_TEST_GRAPHS_PREFILL") == "1"
"""On CUDA: engines also capture graphs of steps with prefill (`cuda_graphs_prefill`)."""


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """arch → (HF model in fp32, saved folder); built once per session."""
    cache: dict[str, tuple[torch.nn.Module, object]] = {}

    def get(arch: str):
        if arch not in cache:
            model = make_hf_model(arch, seed=0)
            path = save_hf_model(model, tmp_path_factory.mktemp(f"model-{arch}"))
            cache[arch] = (model, path)
        return cache[arch]

    return get


def make_engine(model_dir, *, num_pages: int = 256, page_size: int = 16, max_rank: int = 64,
                max_batched_tokens: int = 256, max_resident_adapters: int = 16,
                max_num_seqs: int = 64, max_adapters_per_batch: int | None = None,
                host_cache_bytes: int = 2 * 2**30, prefetch: bool = True,
                device_prefetch: bool = True,
                fairness: bool = True, max_adapter_loads_per_step: int | None = 8,
                max_wait_steps: int = 64, clock=None) -> Engine:
    """An fp32 CPU engine over a tiny model folder (no tokenizer); LORAPLEX_TEST_DEVICE and
    LORAPLEX_TEST_DTYPE move it (to check the CUDA/Triton path against the same oracles).
    `clock` (a callable giving seconds) replaces the wall clock for deadline tests."""
    config = EngineConfig(
        model=str(model_dir), dtype=TEST_DTYPE, device=TEST_DEVICE, load_tokenizer=False,
        cuda_graphs_prefill=TEST_GRAPHS_PREFILL,
        memory=MemoryConfig(page_size=page_size, num_pages=num_pages, max_rank=max_rank,
                            max_resident_adapters=max_resident_adapters,
                            host_cache_bytes=host_cache_bytes, prefetch=prefetch,
                            device_prefetch=device_prefetch),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_batched_tokens,
                                  max_num_seqs=max_num_seqs,
                                  max_adapters_per_batch=max_adapters_per_batch,
                                  max_adapter_loads_per_step=max_adapter_loads_per_step,
                                  max_wait_steps=max_wait_steps, fairness=fairness),
    )
    return Engine(config) if clock is None else Engine(config, clock=clock)


def assert_pool_clean(engine: Engine) -> None:
    """After every request has ended, no KV page is held and nothing is pinned."""
    assert not engine.has_unfinished()
    assert engine.pool.num_kv_pages == 0, engine.pool.usage()
    assert engine.pool.num_kv_pages + engine.pool.num_adapter_pages + engine.pool.num_free_pages \
        == engine.pool.num_pages
    assert engine.residency.num_evictable_pages() == engine.pool.num_adapter_pages
