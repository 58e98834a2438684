"""A small launch-parameter sweep of the decode kernels at Llama-3-8B shapes (GPU).

For decode attention (batches 1 to 128, key blocks, warps and key splits) and the decode LoRA shrink/expand (batch 64, 64
distinct adapters of ranks 8–64), times each (block size, warps) choice as one call inside a
CUDA graph over rotating input sets, next to the bytes it must move over the measured copy
bandwidth. It changes no default: `--tuned FILE` writes a `kernels.tuning` table of the fastest
choices at batch 64, which LORAPLEX_KERNEL_TUNING=FILE puts in force (or, committed as
kernels/tuned/<GPU name>.json, makes that GPU's default). Every choice computes the same function
(the interpreter tests cover block sizes); `--check` compares each result with the reference once.

    python -m loraplex.loadtest.bench_sweep --out DIR      (kernels_sweep.json / .md)
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from loraplex.kernels.attention import paged_attention_ref
from loraplex.kernels.lora import lora_expand_ref
from loraplex.kernels.tuning import Launch
from loraplex.loadtest.bench_kernels import (
    LLAMA3_8B,
    TINY,
    copy_bandwidth,
    graph_time,
    make_decode_kv,
    rotating_lora_sets,
    write_outputs,
)


def timed(calls: list, fn, device: torch.device) -> float:
    """ms of one call of `fn`, replayed in a CUDA graph over every argument set in `calls`."""
    def replay_all() -> None:
        for args in calls:
            fn(*args)

    return graph_time(replay_all, device) / len(calls)


L2_BYTES = 50 * 2**20  # H100's L2: inputs rotate over more than twice this


def sweep_attention(dims, dtype, device, bandwidth, check: bool) -> list[dict]:
    """Decode attention: key block and warps at the launcher's own split count, then each split
    count (flash-decoding shares) at the default block and warps; small batches rotate over
    several K/V sets so that the pages come from HBM, not L2."""
    from loraplex.kernels.attention_triton import attention_into, decode_splits

    rows = []
    elem = torch.tensor([], dtype=dtype).element_size()
    choices = [(block_n, warps, None) for block_n, warps
               in itertools.product((32, 64, 128), (2, 4, 8))]
    choices += [(64, 4, splits) for splits in (1, 2, 4, 8, 16)]
    for batch in (1, 8, 32, 64, 128):
        nbytes = batch * dims.context * 2 * dims.num_kv_heads * dims.head_dim * elem
        sets = []
        for _ in range(min(16, -(-2 * L2_BYTES // nbytes))):
            b = make_decode_kv(batch, dims.context, dims, dtype, device)
            sets.append((torch.empty_like(b["q"]), b["q"], b["k_cache"], b["v_cache"],
                         b["block_tables"], b["context_lens"], b["query_start_loc"],
                         dims.head_dim ** -0.5))
        want = paged_attention_ref(*sets[0][1:]) if check else None
        for block_n, warps, splits in choices:
            chosen = splits or decode_splits(batch, dims.num_kv_heads, dims.context, block_n,
                                             device)

            def fn(*a, block_n=block_n, warps=warps, splits=chosen):
                attention_into(*a, block_n=block_n, num_warps=warps, splits=splits)
            ms = timed(sets, fn, device)
            err = None
            if want is not None:
                out = sets[0][0]
                out.fill_(float("nan"))
                fn(*sets[0])
                err = ((out.float() - want.float()).norm() / want.float().norm()).item()
            rows.append(dict(kernel="attention_decode", batch=batch, block_n=block_n,
                             num_warps=warps, splits=chosen, default=splits is None,
                             programs=batch * dims.num_kv_heads,
                             ms=ms, of_copy_bw=nbytes / (ms * 1e-3) / bandwidth, rel_err=err))
        del sets
    return rows


def sweep_lora(dims, dtype, device, bandwidth, check: bool, batch: int = 64) -> list[dict]:
    from loraplex.kernels import lora_triton as lt

    rows = []
    gen = torch.Generator().manual_seed(3)
    for module, d_in, d_out in (("q_proj", dims.hidden, dims.hidden),
                                ("down_proj", dims.intermediate, dims.hidden)):
        slots = torch.randperm(batch, generator=gen).to(device)
        sets, shrink_bytes, expand_bytes = rotating_lora_sets(batch, slots, d_in, d_out, dtype,
                                                              device, gen)
        max_rank = sets[0][0]["a_rows"].shape[1]
        for block_k, warps, split in itertools.product((128, 256, 512), (2, 4, 8), (1, 2, 4)):
            if split * block_k > d_in:
                continue

            def shrink(p, x, h, out, block_k=block_k, warps=warps, split=split):
                # The split-K planes as `lora_apply` hands them to the expand (which sums them).
                buf = torch.empty((split, 1, batch, max_rank), dtype=torch.float32,
                                  device=device)
                lt.shrink_partials_into(buf, x, p["pool"], p["a_rows"][None], p["ranks"][None],
                                        slots, block_k=block_k, num_warps=warps)
                return buf

            ms = timed(sets, shrink, device)
            err = None
            if check:
                p, x, h, _ = sets[0]
                err = ((shrink(*sets[0]).sum(0)[0] - h).norm() / h.norm()).item()
            rows.append(dict(kernel="lora_shrink", module=module, batch=batch, block=block_k,
                             num_warps=warps, split_k=split, ms=ms,
                             programs=batch * -(-max_rank // 16),
                             of_copy_bw=shrink_bytes / (ms * 1e-3) / bandwidth, rel_err=err))
        for block_n, warps, block_r in itertools.product((64, 128, 256), (2, 4, 8), (16, 32)):
            def expand(p, x, h, out, block_n=block_n, warps=warps, block_r=block_r):
                lt.lora_expand_slices_triton(h[None], p["pool"], p["b_rows"][None],
                                             p["ranks"][None], p["scales"][None], slots, out,
                                             block_n=block_n, block_r=block_r, num_warps=warps)

            ms = timed(sets, expand, device)
            err = None
            if check:
                p, x, h, out = sets[0]
                want = out.clone()
                lora_expand_ref(h, p["pool"], p["b_rows"], p["ranks"], p["scales"], slots, want)
                got = out.clone()
                expand(p, x, h, got)
                err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            rows.append(dict(kernel="lora_expand", module=module, batch=batch, block=block_n,
                             block_r=block_r, num_warps=warps, ms=ms,
                             of_copy_bw=expand_bytes / (ms * 1e-3) / bandwidth, rel_err=err))
        del sets
    return rows


MAX_REL_ERR = 2e-2  # bf16; a choice over it is never picked


def fastest(rows: list[dict], keys: tuple[str, ...]) -> dict | None:
    """The choice (values of `keys`) with the least total ms over the modules of `rows` (a
    choice timed twice for one module counts its faster time) among those timed for every
    module and within MAX_REL_ERR of the reference wherever checked (None if no choice is: off
    CUDA nothing is timed)."""
    modules = {r.get("module") for r in rows}
    per_module: dict[tuple, dict] = {}
    for r in rows:
        bad = r.get("rel_err") is not None and not r["rel_err"] <= MAX_REL_ERR
        ms = float("nan") if bad else r["ms"]
        times = per_module.setdefault(tuple(r[k] for k in keys), {})
        module = r.get("module")
        times[module] = ms if module not in times else min(times[module], ms)
    timed = [(sum(t.values()), c) for c, t in per_module.items()
             if set(t) == modules and all(v == v for v in t.values())]  # v != v: NaN
    return dict(zip(keys, min(timed)[1])) if timed else None


def programs_per_sm(programs: int, splits: int, num_sms: int) -> float:
    """The grid target for which the split heuristics (`decode_splits`, `shrink_split_k`: double
    while programs · splits < target · SMs) stop at `splits` for `programs` programs."""
    return round(programs * (splits - 0.5) / num_sms, 3)


def tuned_table(rows: list[dict], num_sms: int, batch: int = 64) -> dict:
    """A `kernels.tuning` table of the fastest choices at `batch` (the issue's goals are there):
    each kernel's fastest (block, warps[, split]) as measured, summed over the modules swept."""
    table: dict = {}
    def of(kernel: str) -> list[dict]:
        return [r for r in rows if r["kernel"] == kernel and r["batch"] == batch]

    best = fastest(of("attention_decode"), ("block_n", "num_warps", "splits", "programs"))
    if best:
        table.update(attention_block_n=best["block_n"], attention_warps=best["num_warps"],
                     attention_programs_per_sm=programs_per_sm(best["programs"], best["splits"],
                                                               num_sms))
    best = fastest(of("lora_shrink"), ("block", "num_warps", "split_k", "programs"))
    if best:
        table.update(shrink_block_k=best["block"], shrink_warps=best["num_warps"],
                     shrink_programs_per_sm=programs_per_sm(best["programs"], best["split_k"],
                                                            num_sms))
    best = fastest(of("lora_expand"), ("block", "num_warps", "block_r"))
    if best:
        table.update(expand_block_n=best["block"], expand_warps=best["num_warps"],
                     expand_block_r=best["block_r"])
    return table


def table(rows: list[dict], bandwidth: float) -> str:
    keys = ["kernel", "module", "batch", "block", "block_n", "block_r", "num_warps", "split_k",
            "splits", "ms", "of_copy_bw", "rel_err"]
    lines = [f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append("" if v is None else f"{v:.0%}" if k == "of_copy_bw"
                         else f"{v:.4f}" if k == "ms" else f"{v:.1e}" if k == "rel_err"
                         else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (interpreter on CPU)")
    parser.add_argument("--check", action="store_true", help="compare each choice with the ref")
    parser.add_argument("--tuned", type=Path, default=None,
                        help="write a kernels.tuning table of the fastest choices at batch 64")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dims = TINY if args.smoke else LLAMA3_8B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bandwidth = copy_bandwidth(device)
    rows: list[dict] = []
    for name, part in (("attention", sweep_attention), ("lora", sweep_lora)):
        t0 = time.perf_counter()
        try:
            rows += part(dims, dtype, device, bandwidth, args.check)
        except Exception as error:  # noqa: BLE001 (report the other part all the same)
            print(f"[{name} failed: {error!r}]"[:2000], flush=True)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    write_outputs(args.out, "kernels_sweep", dict(copy_bandwidth=bandwidth, rows=rows),
                  table(rows, bandwidth))
    if args.tuned is not None and rows:
        from loraplex.kernels.lora_triton_common import num_sms
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        tuned = dict(device=name, source=f"loadtest/bench_sweep.py --tuned, "
                     f"{time.strftime('%Y-%m-%d')}: fastest at batch 64, Llama-3-8B shapes, bf16")
        tuned.update(tuned_table(rows, num_sms(device)))
        Launch.from_dict(tuned, str(args.tuned))  # a table the kernels accept
        args.tuned.parent.mkdir(parents=True, exist_ok=True)
        args.tuned.write_text(json.dumps(tuned, indent=1) + "\n")
        print(f"tuned table → {args.tuned}: {json.dumps(tuned)}", flush=True)


if __name__ == "__main__":
    main()
