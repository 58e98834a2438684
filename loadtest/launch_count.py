"""Kernel launches of one engine step on the GPU path, counted on any machine.

A graph-replayed decode step of a big model still pays each kernel's start (a few µs), so the
number of launches per step is a cost of its own. This counts them without a GPU: the model's
forward runs with the Triton twins picked (`LORAPLEX_KERNELS=triton`) under Triton's interpreter,
but every Triton launch is only counted, not run, and every torch op that would launch a CUDA
kernel is counted by a dispatch mode (views, `empty` and other metadata-only ops launch
nothing). Every launch's grid and arguments depend only on shapes on this path (it is captured
in CUDA graphs), so the counts are those of the GPU; the SM count is set to an H100's.

Shapes are Llama-3-8B's (vocabulary 32,000) at batch 64, context 1024: the forward runs with one
and with two layers, and the difference is the count per layer. Settings as `bench_step`'s
decode step: base only, (a) rank 16 on q/k/v/o, (b) ranks 8–64 on all seven projections; the
LoRA launches go to the targeted projections only, as the engine's steps (and its CUDA graphs)
do, or to all seven with `--all-modules` (what the graphs did before they were keyed by them).

    python -m loraplex.loadtest.launch_count [--out DIR]     (launch_count.json / .md)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loraplex.loadtest.bench_kernels import write_outputs

H100_SMS = 132
SHAPES = {  # hidden, intermediate, heads, KV heads, head_dim, vocabulary
    "llama3-8b": (4096, 14336, 32, 8, 128, 32000),
    "tiny": (64, 128, 4, 2, 16, 256),  # the same launches but for shape-driven heuristics
}
NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
             "lift_fresh", "_unsafe_view", "sym_size", "sym_stride", "sym_numel", "is_same_size",
             "set_", "resize_"}


class LaunchCounter(TorchDispatchMode):
    """Counts torch ops that launch a kernel on CUDA, by name, and host reads of device values."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "item"):
            self.host_reads += 1
        elif name not in NO_LAUNCH and not _is_view(func) and _has_tensor(out):
            self.ops[name] += 1
        return out


def _has_tensor(out) -> bool:
    return isinstance(out, torch.Tensor) or (
        isinstance(out, (tuple, list)) and any(isinstance(o, torch.Tensor) for o in out))


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                 for r in returns)


def count_triton_launches(triton_counts: collections.Counter) -> None:
    """Patch the interpreter: a Triton launch is counted by kernel name and not run."""
    from triton.runtime.interpreter import InterpretedFunction

    def run(self, *args, grid, warmup, **kwargs):
        triton_counts[self.fn.__name__] += 1

    InterpretedFunction.run = run


def set_sms(num: int) -> None:
    """The launchers' SM count (a CPU reports 4) → an H100's, so split heuristics match."""
    from loraplex.kernels import attention_triton, lora_triton, lora_triton_common

    for module in (attention_triton, lora_triton, lora_triton_common):
        if hasattr(module, "num_sms"):
            module.num_sms = lambda device, num=num: num


def count_step(num_layers: int, setting: str, step: str, batch: int, context: int,
               all_modules: bool, shape: str = "llama3-8b") -> dict:
    from loraplex.loadtest.bench_kernels import RANKS
    from loraplex.loadtest.bench_step import (
        TARGETS,
        adapters_numel,
        decode_context,
        place_adapters,
        random_weights,
    )
    from loraplex.memory.kv import KVLayout
    from loraplex.model.config import ModelConfig, module_indices
    from loraplex.model.models.llama import LlamaModel

    hidden, intermediate, heads, kv_heads, head_dim, vocab = SHAPES[shape]
    config = ModelConfig(
        model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_layers=num_layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, has_qk_norm=False)
    dtype, device = torch.bfloat16, torch.device("cpu")
    model = LlamaModel(config, random_weights(config, dtype, device))
    targets, ranks = {"base": (TARGETS, RANKS), "a_rank16_qkvo": (TARGETS[:4], (16,)),
                      "b_mixed_all7": (TARGETS, RANKS)}[setting]
    num_adapters = 0 if setting == "base" else batch
    page_size = 16
    layout = KVLayout(config.num_layers, page_size, config.num_kv_heads, config.head_dim)
    num_kv_pages = batch * -(-context // page_size)
    numel = adapters_numel(config, targets, ranks, num_adapters)
    pool = torch.zeros(num_kv_pages + -(-numel // layout.page_numel) + 1, layout.page_numel,
                       dtype=dtype)
    tables, _ = place_adapters(config, targets, ranks, num_adapters, pool.view(-1),
                               num_kv_pages * layout.page_numel, torch.Generator().manual_seed(0))
    ctx = decode_context(config, pool, tables, batch, context, page_size, num_adapters, device)
    if num_adapters and not all_modules:  # only the targeted projections, as the engine does
        ctx.adapter_modules = module_indices(targets)
    if step == "mixed":  # every sequence one LoRA segment (prefill form), as mixed graphs run
        ctx.lora_seg_starts = ctx.query_start_loc
        ctx.lora_seg_slots = ctx.lora_token_slots
    ids = torch.zeros(batch, dtype=torch.int64)
    rows = torch.arange(batch)
    triton_counts: collections.Counter[str] = collections.Counter()
    counter = LaunchCounter()
    count_triton_launches(triton_counts)
    with counter:
        model.forward(ids, ctx, rows)
    return dict(torch_ops=dict(counter.ops), triton=dict(triton_counts),
                host_reads=counter.host_reads)


def child(args: argparse.Namespace) -> None:
    set_sms(H100_SMS)
    result = count_step(args.layers, args.setting, args.step, args.batch, args.context,
                        args.all_modules, args.shape)
    print(json.dumps(result))


def run_child(layers: int, setting: str, step: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", LORAPLEX_KERNELS="triton")
    proc = subprocess.run(
        [sys.executable, "-m", "loraplex.loadtest.launch_count", "--child", "--layers",
         str(layers), "--setting", setting, "--step", step, "--batch", str(args.batch),
         "--context", str(args.context), "--shape", args.shape]
        + (["--all-modules"] if args.all_modules else []),
        env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def total(counts: dict) -> int:
    return sum(counts["torch_ops"].values()) + sum(counts["triton"].values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--model-layers", type=int, default=32, help="layers of the step reported")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--all-modules", action="store_true",
                        help="LoRA launches for all seven projections, not only those targeted")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--setting", default="base", help=argparse.SUPPRESS)
    parser.add_argument("--step", default="decode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    results = []
    for step in ("decode", "mixed"):
        for setting in ("base", "a_rank16_qkvo", "b_mixed_all7"):
            one, two = (run_child(n, setting, step, args) for n in (1, 2))
            per_layer = total(two) - total(one)
            layer_ops = collections.Counter(two["torch_ops"]) - collections.Counter(
                one["torch_ops"])
            layer_triton = collections.Counter(two["triton"]) - collections.Counter(one["triton"])
            results.append(dict(
                step=step, setting=setting, per_layer=per_layer,
                fixed=total(one) - per_layer,
                per_step=total(one) - per_layer + args.model_layers * per_layer,
                host_reads=two["host_reads"], layer_torch_ops=dict(layer_ops),
                layer_triton=dict(layer_triton)))
            print(json.dumps(results[-1]), flush=True)
    lines = [f"Kernel launches per step, {args.shape} shapes, batch {args.batch}, context "
             f"{args.context}, {args.model_layers} layers (Triton path, H100 SM count"
             f"{'; LoRA on all seven projections' if args.all_modules else ''})", "",
             "| step | setting | per layer | outside layers | per step | host reads |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['step']} | {r['setting']} | {r['per_layer']} | {r['fixed']} | "
                     f"{r['per_step']} | {r['host_reads']} |")
    write_outputs(args.out, "launch_count", results, "\n".join(lines))


if __name__ == "__main__":
    main()
