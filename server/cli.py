"""`loraplex` command line: flags → configs → engine. `serve` lands with the HTTP server.

Today: `loraplex generate PROMPT [...]` runs the offline engine (chat template by default).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from loraplex.memory.config import MemoryConfig
from loraplex.model.sampler import SamplingParams
from loraplex.scheduler.config import SchedulerConfig
from loraplex.scheduler.engine import Engine, EngineConfig


def _adapter_flag(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate offline for one or more prompts")
    gen.add_argument("prompts", nargs="+", help="prompt text (one request each)")
    gen.add_argument("--model", default=None,
                     help="HF directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    gen.add_argument("--adapter", action="append", type=_adapter_flag, default=[],
                     metavar="NAME=DIR", help="register a PEFT adapter (repeatable)")
    gen.add_argument("--use", default=None, metavar="NAME", help="adapter for every prompt")
    gen.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    gen.add_argument("--dtype", default=None)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="no chat template: complete the text")
    gen.add_argument("--pool-mib", type=int, default=512, help="page pool size in MiB")
    return parser


def generate(args: argparse.Namespace) -> int:
    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                          memory=MemoryConfig(pool_bytes=args.pool_mib * 2**20),
                          scheduler=SchedulerConfig())
    engine = Engine(config)
    for name, path in args.adapter:
        engine.add_adapter(name, path)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            seed=args.seed)
    prompts = [p if args.raw else engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": p}]) for p in args.prompts]
    t0 = time.perf_counter()
    outputs = engine.generate(prompts, params, [args.use] * len(prompts))
    elapsed = time.perf_counter() - t0
    for prompt, out in zip(args.prompts, outputs):
        sys.stdout.write(f"> {prompt}\n{out.text}\n\n")
    num_tokens = sum(len(o.token_ids) for o in outputs)
    logging.getLogger("loraplex").info("%d tokens in %.2f s", num_tokens, elapsed)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return generate(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
