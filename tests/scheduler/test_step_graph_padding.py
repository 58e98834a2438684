"""The CUDA-graph path's padding, checked without CUDA: `StepGraphs(capture=False)` runs every
step on the padded static buffers (pad tokens, pad sequences, per-sequence LoRA segments, the
extra logits rows) eagerly, and the tokens must still be `PeftModel.generate`'s.

Run under `LORAPLEX_KERNELS=triton TRITON_INTERPRET=1` too (`test_engine_triton_path.py`), so
the Triton kernels see the same padded inputs a captured graph gives them on a GPU.
"""

from __future__ import annotations

from loraplex.model.config import TARGET_MODULES
from loraplex.model.graphs import StepGraphs
from tests.conftest import assert_pool_clean, make_engine
from tests.scheduler.test_engine_batching import (  # noqa: F401 (fixtures)
    ARCH,
    adapter_dirs,
    expected,
    greedy,
    register,
    workload,
)


def static_graphs(engine, max_tokens: int) -> StepGraphs:
    sc = engine.config.scheduler
    graphs = StepGraphs(engine.model, sc.max_num_seqs, -(-engine.max_model_len // 16),
                        max_tokens, capture=False)
    engine.runner.graphs = graphs
    return graphs


def test_padded_steps_give_peft_tokens(tiny_model_dir, adapter_dirs, expected):  # noqa: F811
    engine = make_engine(tiny_model_dir(ARCH)[1], max_num_seqs=12, max_batched_tokens=96)
    graphs = static_graphs(engine, 96)
    register(engine, adapter_dirs)
    # More than 12 requests: late ones join while others decode (mixed steps); SHiRA tokens
    # among them gather through the graphs' own slot buffer (unfused: the batch is mixed).
    requests = workload(24)
    assert any(a == "shira4" for _, a in requests)
    outs = engine.generate([p for p, _ in requests], greedy(), [a for _, a in requests])
    for (p, a), out in zip(requests, outs):
        assert out.token_ids == expected(a, p), f"adapter {a}, prompt of {len(p)}"
    # Both kinds of step ran padded, SHiRA tokens in some of them.
    assert min(graphs.num_steps.values()) > 0, graphs.num_steps
    assert_pool_clean(engine)


def test_graphs_launch_only_the_modules_the_batch_targets(tiny_model_dir, adapter_dirs,  # noqa: F811
                                                          expected):  # noqa: F811
    """A batch of q/v-only adapters keys (and, on a GPU, captures) a graph that skips the other
    projections' LoRA launches; mixing in other targets widens the set; tokens stay peft's."""
    engine = make_engine(tiny_model_dir(ARCH)[1], max_num_seqs=4, max_batched_tokens=64)
    graphs = static_graphs(engine, 64)
    register(engine, adapter_dirs)
    prompts = [p for p, _ in workload(3)]
    outs = engine.generate(prompts[:2], greedy(), ["r8-qv", "r8-qv"])
    outs += engine.generate(prompts[2:], greedy(), ["r7-attn"])
    for p, a, out in zip(prompts, ["r8-qv", "r8-qv", "r7-attn"], outs):
        assert out.token_ids == expected(a, p)
    index = {name: i for i, name in enumerate(TARGET_MODULES)}
    assert frozenset((index["q_proj"], index["v_proj"])) in graphs.module_sets
    assert frozenset(index[m] for m in ("q_proj", "k_proj", "v_proj", "o_proj")) \
        in graphs.module_sets
    assert_pool_clean(engine)


def test_decode_only_graphs_leave_mixed_steps_eager(tiny_model_dir, adapter_dirs,  # noqa: F811
                                                    expected):  # noqa: F811
    """The default (no prefill graphs: no token buckets): decode steps run padded, steps with
    prefill tokens are left to the eager path, and the tokens are still peft's."""
    engine = make_engine(tiny_model_dir(ARCH)[1], max_num_seqs=6, max_batched_tokens=64)
    graphs = static_graphs(engine, 0)
    register(engine, adapter_dirs)
    requests = workload(8)
    outs = engine.generate([p for p, _ in requests], greedy(), [a for _, a in requests])
    for (p, a), out in zip(requests, outs):
        assert out.token_ids == expected(a, p), f"adapter {a}, prompt of {len(p)}"
    assert graphs.num_steps["decode"] > 0 and graphs.num_steps["mixed"] == 0, graphs.num_steps
    assert_pool_clean(engine)
