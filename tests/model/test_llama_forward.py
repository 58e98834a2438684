"""Our forward vs transformers' on the base model: chunked prefill through page tables, RoPE types."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loraplex.memory.kv import KVLayout, PageTable
from loraplex.memory.pool import PagePool, PageUse
from loraplex.model.config import ModelConfig, UnsupportedModelError
from loraplex.model.models.llama import ForwardContext, LlamaModel

ROPE = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
}


def tiny_llama(rope_scaling: dict | None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                      max_position_embeddings=512, rope_scaling=rope_scaling)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.25)
    return model


def run_chunks(model: LlamaModel, ids: torch.Tensor, chunks: list[list[tuple[int, int, int]]],
               page_size: int = 4) -> dict[int, list[torch.Tensor]]:
    """Feed (sequence, start, end) chunks step by step; every position's logits per sequence."""
    c = model.config
    layout = KVLayout(c.num_layers, page_size, c.num_kv_heads, c.head_dim)
    pool = PagePool(64, layout.page_numel, torch.float32, torch.device("cpu"))
    pool.allocate(5, PageUse.KV)  # the sequences' pages do not start at 0
    tables = {b: PageTable() for b in range(ids.shape[0])}
    rows: dict[int, list[torch.Tensor]] = {b: [] for b in tables}
    for step in chunks:
        toks, pos, slots, lens, starts = [], [], [], [], [0]
        for b, s, e in step:
            tables[b].grow(pool, layout, e)
            toks.append(ids[b, s:e])
            pos.append(torch.arange(s, e))
            slots.append(tables[b].slots(layout, s, e))
            lens.append(e)
            starts.append(starts[-1] + e - s)
        width = max(len(tables[b].pages) for b, _, _ in step)
        block_tables = torch.zeros(len(step), width, dtype=torch.int32)
        for i, (b, _, _) in enumerate(step):
            block_tables[i, : len(tables[b].pages)] = torch.tensor(tables[b].pages)
        ctx = ForwardContext(torch.cat(pos), torch.cat(slots), block_tables,
                             torch.tensor(lens, dtype=torch.int32),
                             torch.tensor(starts, dtype=torch.int32), layout.caches(pool.tensor),
                             pool.tensor.view(-1), None, None, None)
        tokens = torch.cat(toks)
        logits = model.forward(tokens, ctx, torch.arange(tokens.numel()))
        for i, (b, _, _) in enumerate(step):
            rows[b].extend(logits[starts[i]:starts[i + 1]])
    return rows


@pytest.mark.parametrize("rope", sorted(ROPE))
def test_chunked_prefill_and_decode_match_transformers(rope):
    hf = tiny_llama(ROPE[rope])
    ours = LlamaModel(ModelConfig.from_hf_dict(hf.config.to_dict()),
                      {k: v.detach() for k, v in hf.state_dict().items()})
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(1))
    # seq 0: prefill in chunks of 7 and 13, then decode; seq 1: one prefill of 25, then decode.
    steps = [[(0, 0, 7), (1, 0, 25)], [(0, 7, 20)]]
    steps += [[(0, p, p + 1)] + ([(1, p + 5, p + 6)] if p + 6 <= 30 else []) for p in range(20, 30)]
    rows = run_chunks(ours, ids, steps)
    with torch.no_grad():
        ref = hf(ids).logits
    for b in (0, 1):
        got = torch.stack(rows[b])
        assert (got - ref[b, : got.shape[0]]).abs().max() <= 1e-4
    assert len(rows[0]) == 30 and len(rows[1]) == 30
    if ROPE[rope] is not None:  # the scaling must matter, or the test proves nothing
        with torch.no_grad():
            assert (tiny_llama(None)(ids).logits - ref).abs().max() > 1e-2


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_other_rope_types_are_refused(rope_type):
    cfg = tiny_llama(None).config.to_dict()
    cfg["rope_scaling"] = {"rope_type": rope_type, "factor": 2.0}
    with pytest.raises(UnsupportedModelError, match=rope_type):
        ModelConfig.from_hf_dict(cfg)


def test_unknown_architecture_is_refused():
    cfg = tiny_llama(None).config.to_dict()
    cfg["model_type"] = "gpt2"
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        ModelConfig.from_hf_dict(cfg)
