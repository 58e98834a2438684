"""Kernel benchmarks of issue 4: each Triton kernel vs its torch reference vs the hardware.

On a GPU (Llama-3-8B shapes, bf16; about 3 minutes on an H100):

    .venv/bin/python -m loraplex.loadtest.bench_kernels --out results/    # or loadtest/gpu_check.sh

On CPU, to check that it runs (tiny shapes, fp32, references only):

    .venv/bin/python -m loraplex.loadtest.bench_kernels --smoke

Reports achieved bytes/s over the device-to-device copy bandwidth measured in the same run (copy
bytes = read + written) for the memory-bound kernels, and one decode step of the whole model
(random weights) at batch 64, base only vs 1 vs 64 adapters, next to its byte floor. Prints a
table and writes `kernels.json` and `kernels.md` under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.kernels import dispatch
from loraplex.kernels.attention import paged_attention_ref
from loraplex.kernels.lora import (
    lora_expand_ref,
    lora_expand_segments_ref,
    lora_shrink_ref,
    lora_shrink_segments_ref,
)

RANKS = (8, 16, 32, 64)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Dims:
    """Model dimensions of a run (Llama-3-8B, or tiny for --smoke)."""

    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    vocab: int
    batches: tuple[int, ...]
    context: int


LLAMA3_8B = Dims(4096, 14336, 32, 8, 128, 32, 128256, (1, 8, 32, 64, 128, 256), 1024)
TINY = Dims(64, 128, 4, 2, 16, 2, 256, (1, 8), 32)


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of `fn` (CUDA events through do_bench on GPU; host clock on CPU)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    numel = 2**28 if device.type == "cuda" else 2**22
    src = torch.randn(numel, device=device, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def twin(ref: Callable, device: torch.device) -> Callable:
    """The Triton twin on CUDA (or the reference, where Triton does not run)."""
    return dispatch.pick(ref, device)


# ---- LoRA kernels -----------------------------------------------------------------------------------

def make_adapters(num_adapters: int, d_in: int, d_out: int, dtype: torch.dtype,
                  device: torch.device, gen: torch.Generator) -> dict:
    """A pool holding `num_adapters` adapters of mixed ranks (A rows then Bᵀ rows, 16-byte
    aligned as the residency packer places them), plus their tables."""
    ranks = torch.tensor([RANKS[i % len(RANKS)] for i in range(num_adapters)])
    ranks = ranks[torch.randperm(num_adapters, generator=gen)]
    max_rank = max(RANKS)
    a_numel, b_numel = int(ranks.sum()) * d_in, int(ranks.sum()) * d_out
    pool = torch.empty(a_numel + b_numel, dtype=dtype, device=device).normal_(0, 0.02)
    a_rows = torch.zeros(num_adapters, max_rank, dtype=torch.int64)
    b_rows = torch.zeros(num_adapters, max_rank, dtype=torch.int64)
    a_off, b_off = 0, a_numel
    for s, r in enumerate(ranks.tolist()):
        a_rows[s, :r] = a_off + torch.arange(r) * d_in
        b_rows[s, :r] = b_off + torch.arange(r) * d_out
        a_off, b_off = a_off + r * d_in, b_off + r * d_out
    return dict(pool=pool, a_rows=a_rows.to(device), b_rows=b_rows.to(device),
                ranks=ranks.to(device), scales=torch.full((num_adapters,), 0.5, device=device),
                rank_list=ranks.tolist())


def lora_cases(dims: Dims) -> list[tuple[str, int, int]]:
    return [("q_proj", dims.hidden, dims.num_heads * dims.head_dim),
            ("down_proj", dims.intermediate, dims.hidden)]


def rotation(nbytes: int, cache_bytes: int = 50 * 2**20) -> int:
    """Input sets to rotate through so that a timed loop reads ~3× the L2 cache (at most 8)."""
    return max(1, min(8, -(-3 * cache_bytes // max(nbytes, 1))))


def bench_lora(dims: Dims, dtype: torch.dtype, device: torch.device, bandwidth: float,
               with_ref: bool) -> list[dict]:
    """Decode shrink and expand for every batch × number of distinct adapters.

    `ms` times one eager call (launch included); `graph_ms` one call inside a CUDA graph that
    replays the kernel over `rotation()` independent input sets (adapters, x, out), so that the
    adapter rows come from HBM and not from L2; `of_copy_bw` is computed from `graph_ms` where
    there is one (the engine runs decode steps as graphs).
    """
    rows = []
    gen = torch.Generator().manual_seed(0)
    elem = torch.tensor([], dtype=dtype).element_size()
    for module, d_in, d_out in lora_cases(dims):
        for batch in dims.batches:
            for num_adapters in sorted({1, min(8, batch), batch}):
                slots = (torch.randperm(batch, generator=gen) % num_adapters).to(device)
                sets, byte_counts = [], []
                for i in range(8):
                    p = make_adapters(num_adapters, d_in, d_out, dtype, device, gen)
                    x = torch.randn(batch, d_in, generator=gen).to(dtype).to(device)
                    h = lora_shrink_ref(x, p["pool"], p["a_rows"], p["ranks"], slots)
                    out = torch.randn(batch, d_out, generator=gen).to(dtype).to(device)
                    sets.append(((x, p["pool"], p["a_rows"], p["ranks"], slots),
                                 (h, p["pool"], p["b_rows"], p["ranks"], p["scales"], slots, out)))
                    used = sorted(set(slots.tolist()))
                    rank_sum = sum(p["rank_list"][s] for s in used)
                    max_rank = p["a_rows"].shape[1]
                    shrink_bytes = rank_sum * d_in * elem + batch * (d_in * elem + max_rank * 4)
                    expand_bytes = rank_sum * d_out * elem \
                        + batch * (max_rank * 4 + 2 * d_out * elem)
                    byte_counts.append((shrink_bytes, expand_bytes))
                    if i + 1 >= rotation(min(shrink_bytes, expand_bytes)):
                        break
                shrink_bytes, expand_bytes = (statistics.mean(b) for b in zip(*byte_counts))
                for k, (op, ref, nbytes) in enumerate((("shrink", lora_shrink_ref, shrink_bytes),
                                                        ("expand", lora_expand_ref, expand_bytes))):
                    fast_fn = twin(ref, device)
                    args = sets[0][k]
                    fast = time_ms(lambda: fast_fn(*args), device)
                    slow = time_ms(lambda: ref(*args), device) if with_ref else float("nan")
                    calls = [set_[k] for set_ in sets]

                    def replay_all() -> None:
                        for a in calls:
                            fast_fn(*a)

                    graph = graph_time(replay_all, device) / len(calls)
                    best = graph if graph == graph else fast
                    rows.append(dict(kernel=f"lora_{op}", module=module, batch=batch,
                                     adapters=num_adapters, ms=fast, ref_ms=slow,
                                     graph_ms=graph, rotation=len(calls), bytes=nbytes,
                                     of_copy_bw=nbytes / (best * 1e-3) / bandwidth))
                del sets
    return rows


def bench_lora_prefill(dims: Dims, dtype: torch.dtype, device: torch.device,
                       with_ref: bool) -> list[dict]:
    """Prefill segments: 8 prompts of 256 tokens (2 per adapter), one of length 1."""
    gen = torch.Generator().manual_seed(1)
    lengths = [256] * 8 + [1] if device.type == "cuda" else [7, 1, 3]
    module, d_in, d_out = lora_cases(dims)[0]
    p = make_adapters(4, d_in, d_out, dtype, device, gen)
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    seg_slots = (torch.arange(len(lengths)) % 4).to(device)
    num_tokens = int(starts[-1])
    x = torch.randn(num_tokens, d_in, generator=gen).to(dtype).to(device)
    out = torch.randn(num_tokens, d_out, generator=gen).to(dtype).to(device)
    h = lora_shrink_segments_ref(x, p["pool"], p["a_rows"], p["ranks"], starts, seg_slots)
    rows = []
    for op, ref, args in (
            ("shrink_segments", lora_shrink_segments_ref,
             (x, p["pool"], p["a_rows"], p["ranks"], starts, seg_slots)),
            ("expand_segments", lora_expand_segments_ref,
             (h, p["pool"], p["b_rows"], p["ranks"], p["scales"], starts, seg_slots, out))):
        fast = time_ms(lambda: twin(ref, device)(*args), device)
        slow = time_ms(lambda: ref(*args), device) if with_ref else float("nan")
        rows.append(dict(kernel=f"lora_{op}", module=module, batch=num_tokens,
                         adapters=4, ms=fast, ref_ms=slow))
    return rows


# ---- attention --------------------------------------------------------------------------------------

def make_decode_kv(batch: int, context: int, dims: Dims, dtype: torch.dtype,
                   device: torch.device, page_size: int = 16) -> dict:
    pages_per_seq = -(-context // page_size)
    num_pages = batch * pages_per_seq
    cache = torch.randn(num_pages, 2, page_size, dims.num_kv_heads, dims.head_dim,
                        device=device, dtype=torch.float32).to(dtype)
    block_tables = torch.randperm(num_pages, device=device).view(batch, pages_per_seq).int()
    return dict(q=torch.randn(batch, dims.num_heads, dims.head_dim, device=device).to(dtype),
                k_cache=cache[:, 0], v_cache=cache[:, 1], block_tables=block_tables,
                context_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
                query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device))


def bench_attention(dims: Dims, dtype: torch.dtype, device: torch.device, bandwidth: float,
                    with_ref: bool) -> list[dict]:
    rows = []
    elem = torch.tensor([], dtype=dtype).element_size()
    for batch in dims.batches:
        b = make_decode_kv(batch, dims.context, dims, dtype, device)
        args = (b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["context_lens"],
                b["query_start_loc"], dims.head_dim ** -0.5)
        nbytes = batch * dims.context * 2 * dims.num_kv_heads * dims.head_dim * elem \
            + 2 * b["q"].numel() * elem
        fast = time_ms(lambda: twin(paged_attention_ref, device)(*args), device)
        slow = time_ms(lambda: paged_attention_ref(*args), device) \
            if with_ref and batch <= 64 else float("nan")
        graph = graph_time(lambda: twin(paged_attention_ref, device)(*args), device)
        best = graph if graph == graph else fast
        rows.append(dict(kernel="paged_attention_decode", module=f"ctx{dims.context}",
                         batch=batch, adapters=0, ms=fast, ref_ms=slow, graph_ms=graph,
                         bytes=nbytes, of_copy_bw=nbytes / (best * 1e-3) / bandwidth))
        del b
    return rows


# ---- one decode step of the whole model -------------------------------------------------------------

def bench_decode_step(dims: Dims, dtype: torch.dtype, device: torch.device, bandwidth: float,
                      batch: int = 64) -> list[dict]:
    """base / 1 adapter / `batch` adapters for (a) rank 16 on q,k,v,o and (b) ranks 8…64 on all
    seven projections; each step's time next to its byte floor over the copy bandwidth."""
    from loraplex.model.config import ModelConfig
    from loraplex.model.models.llama import LlamaModel

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
    from loraplex.memory.adapters import AdapterTables

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
    from loraplex.memory.kv import KVLayout
    from loraplex.model.models.llama import ForwardContext

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


def graph_time(fn: Callable[[], object], device: torch.device) -> float:
    """Median ms of a CUDA-graph replay of `fn` (NaN on CPU or when capture fails)."""
    if device.type != "cuda":
        return float("nan")
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up: compile the kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return time_ms(graph.replay, device)
    except Exception as error:  # noqa: BLE001 (a measurement, not a contract)
        print(f"graph capture failed: {error!r}"[:300])
        return float("nan")


# ---- whole-model parity: Triton path vs references ---------------------------------------------------

def parity_check(dtype: torch.dtype, device: torch.device) -> dict:
    """A small random Llama, adapters of mixed ranks on all seven projections (DoRA g on some
    slots), one mixed prefill + decode batch: logits of the Triton path vs LORAPLEX_KERNELS=ref."""
    import os

    from loraplex.memory.kv import KVLayout
    from loraplex.model.config import ModelConfig
    from loraplex.model.models.llama import ForwardContext, LlamaModel

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


# ---- report -----------------------------------------------------------------------------------------

def table(rows: list[dict], bandwidth: float, device_name: str) -> str:
    lines = [f"device: {device_name}; copy bandwidth {bandwidth / 1e9:.0f} GB/s", "",
             "| kernel | module | batch | adapters | ms | ref ms | of copy bw | floor ms | graph ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(key: str, fmt: str = "{:.4f}") -> str:
            v = r.get(key)
            return "" if v is None or v != v else fmt.format(v)
        lines.append(f"| {r['kernel']} | {r['module']} | {r['batch']} | {r['adapters']} | "
                     f"{f('ms')} | {f('ref_ms')} | {f('of_copy_bw', '{:.0%}')} | "
                     f"{f('floor_ms')} | {f('graph_ms')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU)")
    parser.add_argument("--out", type=Path, default=None, help="folder for kernels.json/.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip", default="", help="comma list of: lora,prefill,attention,step")
    parser.add_argument("--no-ref", action="store_true", help="do not time the references")
    parser.add_argument("--parity", action="store_true",
                        help="only the whole-model parity check (Triton vs references)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dims = TINY if args.smoke else LLAMA3_8B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    skip = set(filter(None, args.skip.split(",")))
    if args.parity:
        dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
        results = [parity_check(d, device) for d in dtypes]
        print(json.dumps(results, indent=1))
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "parity.json").write_text(json.dumps(results, indent=1))
        return
    bandwidth = copy_bandwidth(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{device_name}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; "
          f"triton: {dispatch.use_triton(device)}", flush=True)
    rows: list[dict] = []
    failed: list[str] = []
    parts = (("lora", lambda: bench_lora(dims, dtype, device, bandwidth, not args.no_ref)),
             ("prefill", lambda: bench_lora_prefill(dims, dtype, device, not args.no_ref)),
             ("attention", lambda: bench_attention(dims, dtype, device, bandwidth,
                                                   not args.no_ref)),
             ("step", lambda: bench_decode_step(dims, dtype, device, bandwidth,
                                                batch=max(dims.batches[:4]))))
    for name, run in parts:
        if name in skip:
            continue
        t0 = time.perf_counter()
        try:
            rows += run()
        except Exception as error:  # noqa: BLE001 (report the other parts all the same)
            print(f"[{name} failed: {error!r}]"[:2000], flush=True)
            failed.append(name)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = table(rows, bandwidth, device_name)
    print(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernels.json").write_text(json.dumps(
            dict(device=device_name, copy_bandwidth=bandwidth, rows=rows), indent=1))
        (args.out / "kernels.md").write_text(report + "\n")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
