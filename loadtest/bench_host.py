"""Host time per engine step: what the engine's thread spends outside the model's forward
(scheduling, building the batch's tensors, sampling, outputs), which a GPU step waits on.

A tiny random Llama on the CPU keeps the forward cheap; `B` sequences with random LoRA adapters
of ranks 8–64 decode together, and each step's time is split into the forward
(`ModelRunner.run`) and the rest. Measured twice in one process: as it comes, then after
`freeze_heap()` (what `loraplex serve` does once set up).

    python -m loraplex.loadtest.bench_host [--batches 64,128,256] [--steps 30]
        [--output-tokens N] [--out DIR]     (N: tokens each sequence has generated before)
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from loraplex.loadtest.bench_kernels import write_outputs
from loraplex.loadtest.random_model import model_shape, write_adapters, write_random_model
from loraplex.memory.config import MemoryConfig
from loraplex.model.config import ModelConfig
from loraplex.model.sampler import SamplingParams
from loraplex.scheduler.config import SchedulerConfig
from loraplex.scheduler.engine import Engine, EngineConfig, freeze_heap

RANKS = (8, 16, 32, 64)


def measure(engine: Engine, num_steps: int) -> tuple[float, float]:
    """(ms per step, ms of it in the forward) over `num_steps` steps."""
    forward = [0.0]
    run = engine.runner.run

    def timed_run(batch):
        t = time.perf_counter()
        try:
            return run(batch)
        finally:
            forward[0] += time.perf_counter() - t

    engine.runner.run = timed_run
    try:
        t0 = time.perf_counter()
        for _ in range(num_steps):
            engine.step()
        total = time.perf_counter() - t0
    finally:
        engine.runner.run = run
    return total / num_steps * 1e3, forward[0] / num_steps * 1e3


def bench(root: Path, batch: int, num_adapters: int, num_steps: int,
          output_tokens: int = 0) -> dict:
    gen = torch.Generator().manual_seed(0)
    model_dir = write_random_model(root / "model", model_shape(True), torch.float32, gen, 2)
    cfg = ModelConfig.from_dir(model_dir)
    paths = write_adapters(root / "adapters", cfg, num_adapters, RANKS, ("q_proj", "v_proj"),
                           torch.float32, gen, 0, 2)
    engine = Engine(EngineConfig(
        model=str(model_dir), dtype="float32", device="cpu", load_tokenizer=False,
        memory=MemoryConfig(pool_bytes=256 * 2**20, max_rank=max(RANKS),
                            max_resident_adapters=num_adapters, host_cache_bytes=2**30),
        scheduler=SchedulerConfig(max_num_batched_tokens=4096, max_num_seqs=batch)))
    names = list(paths)
    for name in names:
        engine.add_adapter(name, paths[name])
    params = SamplingParams(max_tokens=output_tokens + 10 + 2 * num_steps + 10, temperature=0,
                            ignore_eos=True)
    for i in range(batch):
        engine.add_request([(7 * i + j) % cfg.vocab_size for j in range(16)], params,
                           names[i % len(names)], f"r{i}")
    for _ in range(5 + output_tokens):  # prefill, adapter loads, then outputs of that length
        engine.step()
    row = {"batch": batch, "output_tokens": output_tokens}
    for label in ("as_is", "frozen"):
        if label == "frozen":
            freeze_heap()
        step_ms, forward_ms = measure(engine, num_steps)
        row[label] = {"step_ms": step_ms, "forward_ms": forward_ms,
                      "host_ms": step_ms - forward_ms}
    gc.unfreeze()
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="64,128,256")
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output-tokens", type=int, default=0,
                        help="tokens each sequence generates before the measured steps")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (int(b) for b in args.batches.split(",")):
            rows.append(bench(Path(tmp), batch, args.adapters, args.steps, args.output_tokens))
            print(json.dumps(rows[-1]), flush=True)
    lines = ["| sequences | output tokens | host ms/step | host ms/step after freeze_heap | "
             "forward ms/step |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['output_tokens']} | {r['as_is']['host_ms']:.2f} | "
                     f"{r['frozen']['host_ms']:.2f} | {r['as_is']['forward_ms']:.2f} |")
    write_outputs(args.out, "bench_host", rows, "\n".join(lines))


if __name__ == "__main__":
    main()
