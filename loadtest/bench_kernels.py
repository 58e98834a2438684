"""Kernel benchmarks of issue 4: each Triton kernel vs its torch reference vs the hardware.

On a GPU (Llama-3-8B shapes, bf16; about 3 minutes on an H100):

    .venv/bin/python -m loraplex.loadtest.bench_kernels --out results/    # or loadtest/gpu_check.sh

On CPU, to check that it runs (tiny shapes, fp32, references only):

    .venv/bin/python -m loraplex.loadtest.bench_kernels --smoke

Reports achieved bytes/s over the device-to-device copy bandwidth measured in the same run (copy
bytes = read + written) for the memory-bound kernels, and one decode step of the whole model
(random weights) at batch 64, base only vs 1 vs 64 adapters, next to its byte floor. Prints a
table and writes `kernels.json` and `kernels.md` under --out. The whole-model decode step and
the `--parity` check live in `bench_step.py` (which imports this module's dimensions and timers).
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

from loraplex.kernels import dispatch, tuning
from loraplex.kernels.attention import paged_attention_ref
from loraplex.kernels.lora import (
    lora_expand_ref,
    lora_expand_segments_ref,
    lora_shrink_ref,
    lora_shrink_segments_ref,
)

RANKS = (8, 16, 32, 64)


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


def rotating_lora_sets(num_adapters: int, slots: torch.Tensor, d_in: int, d_out: int,
                       dtype: torch.dtype, device: torch.device, gen: torch.Generator
                       ) -> tuple[list[tuple], float, float]:
    """`rotation()` independent input sets (adapters p, x, h = shrink_ref(x), out) for decode
    LoRA on `slots`, and the mean bytes one shrink and one expand must move."""
    sets, byte_counts = [], []
    elem = torch.tensor([], dtype=dtype).element_size()
    batch = slots.shape[0]
    used = sorted(set(slots.tolist()))
    for i in range(8):
        p = make_adapters(num_adapters, d_in, d_out, dtype, device, gen)
        x = torch.randn(batch, d_in, generator=gen).to(dtype).to(device)
        h = lora_shrink_ref(x, p["pool"], p["a_rows"], p["ranks"], slots)
        out = torch.randn(batch, d_out, generator=gen).to(dtype).to(device)
        sets.append((p, x, h, out))
        rank_sum = sum(p["rank_list"][s] for s in used)
        max_rank = p["a_rows"].shape[1]
        shrink_bytes = rank_sum * d_in * elem + batch * (d_in * elem + max_rank * 4)
        expand_bytes = rank_sum * d_out * elem + batch * (max_rank * 4 + 2 * d_out * elem)
        byte_counts.append((shrink_bytes, expand_bytes))
        if i + 1 >= rotation(min(shrink_bytes, expand_bytes)):
            break
    shrink_bytes, expand_bytes = (statistics.mean(b) for b in zip(*byte_counts))
    return sets, shrink_bytes, expand_bytes


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
    for module, d_in, d_out in lora_cases(dims):
        for batch in dims.batches:
            for num_adapters in sorted({1, min(8, batch), batch}):
                slots = (torch.randperm(batch, generator=gen) % num_adapters).to(device)
                lora_sets, shrink_bytes, expand_bytes = rotating_lora_sets(
                    num_adapters, slots, d_in, d_out, dtype, device, gen)
                sets = [((x, p["pool"], p["a_rows"], p["ranks"], slots),
                         (h, p["pool"], p["b_rows"], p["ranks"], p["scales"], slots, out))
                        for p, x, h, out in lora_sets]
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


def write_outputs(out: Path | None, stem: str, data: object, report: str) -> None:
    """Print a benchmark's Markdown report; with `out`, also write `<stem>.json` (data) and
    `<stem>.md` there (what every benchmark script here leaves behind)."""
    print(report)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
        (out / f"{stem}.md").write_text(report + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU)")
    parser.add_argument("--out", type=Path, default=None, help="folder for kernels.json/.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip", default="",
                        help="comma list of: lora,prefill,attention,fused,step")
    parser.add_argument("--no-ref", action="store_true", help="do not time the references")
    parser.add_argument("--parity", action="store_true",
                        help="only the whole-model parity check (Triton vs references)")
    args = parser.parse_args(argv)
    # Here, not at the top: bench_step imports Dims and the timers from this module.
    from loraplex.loadtest.bench_fused import bench_fused
    from loraplex.loadtest.bench_step import bench_decode_step, parity_check

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
          f"triton: {dispatch.use_triton(device)}; launch parameters off the defaults: "
          f"{tuning.launch(device).changed()}", flush=True)
    rows: list[dict] = []
    failed: list[str] = []
    parts = (("lora", lambda: bench_lora(dims, dtype, device, bandwidth, not args.no_ref)),
             ("prefill", lambda: bench_lora_prefill(dims, dtype, device, not args.no_ref)),
             ("attention", lambda: bench_attention(dims, dtype, device, bandwidth,
                                                   not args.no_ref)),
             ("fused", lambda: bench_fused(dims, dtype, device, bandwidth, not args.no_ref)),
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
    write_outputs(args.out, "kernels", dict(device=device_name, copy_bandwidth=bandwidth,
                                            rows=rows), table(rows, bandwidth, device_name))
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
