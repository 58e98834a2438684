"""The whole-model benchmarks of issue 4: one decode step of a random-weight Llama, and the
whole-model parity check (Triton path vs references).

Owns `bench_decode_step` (base only vs 1 vs `batch` adapters, each step next to its byte floor),
`parity_check`, and their builders: `random_weights`, `adapters_numel`, `place_adapters`,
`decode_context`. Imports the dimensions and timers from `bench_kernels` (`Dims`, `RANKS`,
`time_ms`, `graph_time`) and the model, page layout and adapter tables from the package;
`bench_kernels` runs these from its command line (`--skip step`, `--parity`).
"""

from __future__ import annotations

import os

import torch

from loraplex.kernels import dispatch
from loraplex.loadtest.bench_kernels import RANKS, Dims, graph_time, time_ms
from loraplex.memory.adapters import AdapterTables
from loraplex.memory.kv import KVLayout
from loraplex.model.config import TARGET_MODULES, ModelConfig, module_indices
from loraplex.model.models.llama import ForwardContext, LlamaModel

TARGETS = TARGET_MODULES


# ---- one decode step of the whole model -------------------------------------------------------------

def bench_decode_step(dims: Dims, dtype: torch.dtype, device: torch.device, bandwidth: float,
                      batch: int = 64) -> list[dict]:
    """base / 1 adapter / `batch` adapters for (a) rank 16 on q,k,v,o and (b) ranks 8…64 on all
    seven projections; each step's time next to its byte floor over the copy bandwidth."""
    config = ModelConfig(
        model_type="llama", vocab_size=dims.vocab, hidden_size=dims.hidden,
        intermediate_size=dims.intermediate, num_layers=dims.num_layers,
        num_heads=dims.num_heads, num_kv_heads=dims.num_kv_heads, head_dim=dims.head_dim,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, has_qk_norm=False)
    model = LlamaModel(config, random_weights(config, dtype, device))
    elem = torch.tensor([], dtype=dtype).element_size()
    weight_bytes = sum(t.numel() for lw in model.layers for k, t in lw.items()
                       if k in ("qkv", "o", "gate_up", "down")) * elem \
        + model.lm_head.numel() * elem

    page_size = 16
    page_numel = config.num_layers * 2 * page_size * dims.num_kv_heads * dims.head_dim
    pages_per_seq = -(-dims.context // page_size)
    num_kv_pages = batch * pages_per_seq
    rows = []
    for setting, targets, ranks in (("a_rank16_qkvo", TARGETS[:4], (16,)),
                                    ("b_mixed_all7", TARGETS, RANKS)):
        for num_adapters in (0, 1, batch):
            gen = torch.Generator().manual_seed(2)
            adapter_numel = adapters_numel(config, targets, ranks, num_adapters)
            num_pages = num_kv_pages + -(-adapter_numel // page_numel)
            pool = torch.empty(num_pages, page_numel, dtype=dtype, device=device)
            pool[:num_kv_pages].normal_(0, 1)
            flat = pool.view(-1)
            tables, adapter_bytes = place_adapters(config, targets, ranks, num_adapters,
                                                   flat, num_kv_pages * page_numel, gen)
            ctx = decode_context(config, pool, tables, batch, dims.context, page_size,
                                 num_adapters, device)
            if num_adapters:  # LoRA launches for the targeted projections only, as the engine
                ctx.adapter_modules = module_indices(targets)
            ids = torch.randint(0, dims.vocab, (batch,), device=device)
            logits_indices = torch.arange(batch, device=device)
            ms = time_ms(lambda: model.forward(ids, ctx, logits_indices), device)
            kv_bytes = batch * dims.context * config.num_layers * 2 * dims.num_kv_heads \
                * dims.head_dim * elem
            floor_bytes = weight_bytes + adapter_bytes + kv_bytes
            rows.append(dict(kernel="decode_step", module=setting, batch=batch,
                             adapters=num_adapters, ms=ms, bytes=floor_bytes,
                             floor_ms=floor_bytes / bandwidth * 1e3,
                             adapter_floor_ms=adapter_bytes / bandwidth * 1e3,
                             graph_ms=graph_time(lambda: model.forward(ids, ctx, logits_indices),
                                                 device)))
            del pool, flat, tables, ctx
    return rows


def random_weights(config, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    w = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
         "model.norm.weight": (config.hidden_size,),
         "lm_head.weight": (config.vocab_size, config.hidden_size)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = (config.hidden_size,)
        w[p + "post_attention_layernorm.weight"] = (config.hidden_size,)
        for m in TARGETS:
            kind = "self_attn" if m in TARGETS[:4] else "mlp"
            w[f"{p}{kind}.{m}.weight"] = config.module_shape(m)
    out = {}
    for name, shape in w.items():
        t = torch.empty(shape, dtype=dtype, device=device)
        out[name] = t.fill_(1.0) if name.endswith("norm.weight") else t.normal_(0, 0.02)
    return out


def adapters_numel(config, targets, ranks, num_adapters: int) -> int:
    total = 0
    for s in range(num_adapters):
        for m in targets:
            d_out, d_in = config.module_shape(m)
            total += ranks[s % len(ranks)] * (d_in + d_out) * config.num_layers
    return total


def place_adapters(config, targets, ranks, num_adapters: int, flat: torch.Tensor, start: int,
                   gen: torch.Generator):
    """Random adapters' rows packed after the KV pages; (tables, bytes the step must read)."""
    slots = max(num_adapters, 1)
    tables = AdapterTables.empty(config.num_layers, slots, max(ranks), flat.device)
    offset, elem = start, flat.element_size()
    for s in range(num_adapters):
        r = ranks[s % len(ranks)]
        for m in targets:
            mi = TARGETS.index(m)
            d_out, d_in = config.module_shape(m)
            for layer in range(config.num_layers):
                tables.a_rows[layer, mi, s, :r] = offset + torch.arange(r, device=flat.device) * d_in
                offset += r * d_in
                tables.b_rows[layer, mi, s, :r] = offset + torch.arange(r, device=flat.device) * d_out
                offset += r * d_out
                tables.ranks[layer, mi, s] = r
                tables.scales[layer, mi, s] = 2.0 / r
    flat[start:offset].normal_(0, 0.02)
    return tables, (offset - start) * elem


def decode_context(config, pool: torch.Tensor, tables, batch: int, context: int,
                   page_size: int, num_adapters: int, device: torch.device):
    layout = KVLayout(config.num_layers, page_size, config.num_kv_heads, config.head_dim)
    pages_per_seq = -(-context // page_size)
    block_tables = torch.randperm(batch * pages_per_seq, device=device).view(batch, -1)
    last = context - 1
    slot_mapping = block_tables[:, last // page_size].long() * page_size + last % page_size
    token_slots = torch.arange(batch, device=device) % max(num_adapters, 1)
    return ForwardContext(
        positions=torch.full((batch,), last, device=device),
        slot_mapping=slot_mapping, block_tables=block_tables.int(),
        context_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
        kv_caches=layout.caches(pool), pool_flat=pool.view(-1),
        tables=tables if num_adapters else None,
        lora_token_slots=token_slots if num_adapters else None, shira_token_slots=None)


# ---- whole-model parity: Triton path vs references ---------------------------------------------------

def parity_check(dtype: torch.dtype, device: torch.device) -> dict:
    """A small random Llama, adapters of mixed ranks on all seven projections (DoRA g on some
    slots), one mixed prefill + decode batch: logits of the Triton path vs LORAPLEX_KERNELS=ref."""
    torch.manual_seed(0)
    config = ModelConfig(
        model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512,
        num_layers=3, num_heads=8, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, has_qk_norm=False)
    model = LlamaModel(config, random_weights(config, dtype, device))
    ctx_lens, q_lens, page_size = [40, 9, 300, 17, 1, 64], [40, 1, 300, 1, 1, 5], 16
    layout = KVLayout(config.num_layers, page_size, config.num_kv_heads, config.head_dim)
    pages = [-(-c // page_size) for c in ctx_lens]
    num_kv_pages = sum(pages)
    num_adapters = 4
    adapter_numel = adapters_numel(config, TARGETS, (7, 16, 64, 1), num_adapters)
    num_pages = num_kv_pages + -(-(adapter_numel + 8 * 16384) // layout.page_numel)
    pool = torch.empty(num_pages, layout.page_numel, dtype=dtype, device=device).normal_()
    flat = pool.view(-1)
    gen = torch.Generator().manual_seed(3)
    tables, _ = place_adapters(config, TARGETS, (7, 16, 64, 1), num_adapters, flat,
                               num_kv_pages * layout.page_numel, gen)
    g_start = num_kv_pages * layout.page_numel + adapter_numel
    flat[g_start:].uniform_(0.5, 1.5)
    tables.g_rows[:, :, 1] = g_start + torch.arange(7, device=device) * 16384  # DoRA slot 1
    order = torch.randperm(num_kv_pages, device=device)
    block_tables = torch.zeros(len(ctx_lens), max(pages), dtype=torch.int32, device=device)
    positions, slot_mapping, token_slots, used = [], [], [], 0
    for b, (c, n) in enumerate(zip(ctx_lens, q_lens)):
        block_tables[b, :pages[b]] = order[used:used + pages[b]].int()
        used += pages[b]
        pos = torch.arange(c - n, c, device=device)
        positions.append(pos)
        slot_mapping.append(block_tables[b, pos // page_size].long() * page_size + pos % page_size)
        token_slots.append(torch.full((n,), b % (num_adapters + 1) - 1, device=device))
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    ctx = ForwardContext(
        positions=torch.cat(positions), slot_mapping=torch.cat(slot_mapping),
        block_tables=block_tables,
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
        query_start_loc=starts.to(device), kv_caches=layout.caches(pool), pool_flat=flat,
        tables=tables, lora_token_slots=torch.cat(token_slots), shira_token_slots=None,
        has_dora=True)
    ids = torch.randint(0, config.vocab_size, (sum(q_lens),), device=device)
    every = torch.arange(sum(q_lens), device=device)
    kv_before = pool[:num_kv_pages].clone()
    old = os.environ.get(dispatch.KERNELS_ENV)
    try:
        os.environ[dispatch.KERNELS_ENV] = "ref"
        want = model.forward(ids, ctx, every)
        kv_ref = pool[:num_kv_pages].clone()
        pool[:num_kv_pages] = kv_before
        os.environ.pop(dispatch.KERNELS_ENV)
        got = model.forward(ids, ctx, every)
    finally:
        os.environ.pop(dispatch.KERNELS_ENV, None)
        if old is not None:
            os.environ[dispatch.KERNELS_ENV] = old
    err = float((got - want).norm() / want.norm())
    # K/V written by the step differ by rounding only (later layers see rounded inputs).
    kv_err = float((pool[:num_kv_pages].float() - kv_ref.float()).norm() / kv_ref.float().norm())
    same_tokens = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    return dict(kernel="model_parity", module=str(dtype), batch=sum(q_lens), adapters=4,
                rel_err=err, kv_rel_err=kv_err, argmax_agree=same_tokens,
                triton=dispatch.use_triton(device))
