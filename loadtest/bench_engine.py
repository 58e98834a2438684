"""Engine throughput vs the peft baseline on the demo model (CPU or GPU), one run, one ratio.

    python -m loraplex.loadtest.bench_engine [--num-adapters 100] [--num-requests 200] ...
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from pathlib import Path

import torch

from loraplex.loadtest.baselines import peft_sequential
from loraplex.loadtest.workload import make_adapters, zipf_requests
from loraplex.memory.config import MemoryConfig
from loraplex.model.config import ModelConfig
from loraplex.model.sampler import SamplingParams
from loraplex.model.weights import resolve_model_dir
from loraplex.scheduler.config import SchedulerConfig
from loraplex.scheduler.engine import Engine, EngineConfig

logger = logging.getLogger("loraplex.bench")


def run_loraplex(model_dir: Path, adapters: dict[str, Path], requests, args) -> tuple[int, float]:
    engine = Engine(EngineConfig(
        model=str(model_dir), dtype="float32", device=args.device,
        memory=MemoryConfig(pool_bytes=args.pool_mib * 2**20, max_resident_adapters=128),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_batched_tokens,
                                  max_num_seqs=args.max_num_seqs)))
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    t0 = time.perf_counter()
    for r in requests:
        engine.add_request(r.prompt_ids, SamplingParams(max_tokens=r.max_tokens, temperature=0,
                                                        ignore_eos=True), r.adapter)
    num_tokens = steps = 0
    while engine.has_unfinished():
        num_tokens += sum(len(o.new_token_ids) for o in engine.step())
        steps += 1
    elapsed = time.perf_counter() - t0
    logger.info("loraplex: %d steps, %d preemptions, %d adapter loads", steps,
                engine.scheduler.num_preemptions, engine.residency.num_loads)
    return num_tokens, elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded demo model")
    p.add_argument("--num-adapters", type=int, default=100)
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--baseline-requests", type=int, default=None,
                   help="run the (slow) baseline on the first N requests only; tokens/s compared")
    p.add_argument("--ranks", default="8,16,32,64")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-len", default="16,64")
    p.add_argument("--device", default="cpu")
    p.add_argument("--pool-mib", type=int, default=1024)
    p.add_argument("--max-batched-tokens", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--adapter-dir", default=str(Path.home() / ".cache/loraplex/bench-adapters"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model_dir = resolve_model_dir(args.model)
    config = ModelConfig.from_dir(model_dir)
    ranks = tuple(int(r) for r in args.ranks.split(","))
    targets = tuple(args.targets.split(","))
    adapters = make_adapters(Path(args.adapter_dir) / model_dir.name, config, args.num_adapters,
                             ranks, targets)
    lo, hi = (int(x) for x in args.prompt_len.split(","))
    requests = zipf_requests(sorted(adapters), args.num_requests, config.vocab_size, (lo, hi),
                             args.max_tokens)
    ours_tokens, ours_s = run_loraplex(model_dir, adapters, requests, args)
    base_reqs = requests[: args.baseline_requests or len(requests)]
    base_tokens, base_s = peft_sequential(model_dir, adapters, base_reqs)
    ours_tps, base_tps = ours_tokens / ours_s, base_tokens / base_s
    print(f"machine: {platform.machine()} {platform.processor() or ''} "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {args.device}")
    print(f"workload: {args.num_adapters} adapters ranks {ranks} on {','.join(targets)}, "
          f"{len(requests)} requests (zipf), prompts {lo}-{hi}, {args.max_tokens} new tokens")
    print(f"loraplex: {ours_tokens} tokens in {ours_s:.1f} s = {ours_tps:.1f} tok/s")
    print(f"peft set_adapter+generate: {base_tokens} tokens ({len(base_reqs)} requests) in "
          f"{base_s:.1f} s = {base_tps:.1f} tok/s")
    print(f"ratio: {ours_tps / base_tps:.2f}x")


if __name__ == "__main__":
    main()
