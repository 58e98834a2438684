"""`loraplex` command line: `serve` (the HTTP server), `generate` (offline), and the client
commands (`complete`, `chat`, `adapters …`) that `loraplex.clients.cli` adds."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from typing import TYPE_CHECKING

from loraplex.server.logs import setup_logging

if TYPE_CHECKING:  # the engine side is imported lazily: client commands start fast
    from loraplex.scheduler.engine import EngineConfig
    from loraplex.server.config import ServeConfig

logger = logging.getLogger("loraplex")


def _adapter_flag(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, path


def _engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", action="append", type=_adapter_flag, default=[],
                   metavar="NAME=DIR", help="register a PEFT adapter (repeatable)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")
    p.add_argument("--pool-mib", type=int, default=512,
                   help="the page pool (KV cache and resident adapters) in MiB")
    p.add_argument("--max-batched-tokens", type=int, default=2048,
                   help="tokens per engine step (decode + chunked prefill)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="running sequences at most")
    p.add_argument("--max-rank", type=int, default=64, help="largest adapter rank accepted")
    p.add_argument("--max-resident-adapters", type=int, default=64,
                   help="adapters in the pool at once")
    p.add_argument("--max-adapters-per-batch", type=int, default=None,
                   help="distinct adapters running at once (1: adapter batching off)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run decode steps eagerly on CUDA (no graph capture)")
    p.add_argument("--cuda-graphs-prefill", action="store_true",
                   help="also replay graphs of steps with prefill (experimental)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    _engine_flags(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None,
                       help="the base model's name in `model` (default: its folder's name)")
    serve.add_argument("--adapter-dir", action="append", type=Path, default=[],
                       help="serve every PEFT adapter folder under DIR, by folder name")
    serve.add_argument("--adapter-store", type=Path, default=None,
                       help="where uploads are kept (default: $LORAPLEX_ADAPTER_STORE or "
                       "~/.cache/loraplex/adapter-store)")
    serve.add_argument("--no-uploads", action="store_true", help="disable adapter uploads")
    serve.add_argument("--allow-adapter-path", action="append", type=Path, default=[],
                       help="a directory under which JSON {name, path} registrations may point")
    serve.add_argument("--api-keys", type=Path, default=None,
                       help="JSON file of API keys → tenants (default: open, one tenant)")
    serve.add_argument("--max-upload-mib", type=int, default=512)
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds to let running requests finish on SIGTERM")
    serve.add_argument("--log-format", default="text", choices=["text", "json"])

    gen = sub.add_parser("generate", help="generate offline for one or more prompts")
    _engine_flags(gen)
    gen.add_argument("prompts", nargs="+", help="prompt text (one request each)")
    gen.add_argument("--use", default=None, metavar="NAME", help="adapter for every prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="no chat template: complete the text")
    try:
        from loraplex.clients.cli import add_commands
    except ImportError:  # the client package is optional for the server
        pass
    else:
        add_commands(sub)
    return parser


def engine_config(args: argparse.Namespace) -> "EngineConfig":
    """The engine flags `serve` and `generate` share → `EngineConfig`."""
    from loraplex.memory.config import MemoryConfig
    from loraplex.scheduler.config import SchedulerConfig
    from loraplex.scheduler.engine import EngineConfig

    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device,
        cuda_graphs=not args.no_cuda_graphs, cuda_graphs_prefill=args.cuda_graphs_prefill,
        memory=MemoryConfig(pool_bytes=args.pool_mib * 2**20, max_rank=args.max_rank,
                            max_resident_adapters=args.max_resident_adapters),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_batched_tokens,
                                  max_num_seqs=args.max_num_seqs,
                                  max_adapters_per_batch=args.max_adapters_per_batch))


def serve_config(args: argparse.Namespace) -> "ServeConfig":
    from loraplex.server.config import ServeConfig, default_store_dir

    return ServeConfig(
        engine=engine_config(args), host=args.host, port=args.port,
        served_model_name=args.served_model_name,
        adapters=tuple((n, Path(p)) for n, p in args.adapter),
        adapter_dirs=tuple(args.adapter_dir),
        adapter_store=None if args.no_uploads else (args.adapter_store or default_store_dir()),
        allowed_adapter_paths=tuple(args.allow_adapter_path), api_keys=args.api_keys,
        max_upload_bytes=args.max_upload_mib * 2**20, drain_timeout_s=args.drain_timeout,
        log_format=args.log_format)


def _demo_name(config: "ServeConfig") -> "ServeConfig":
    if config.served_model_name is None and config.engine.model is None:
        from dataclasses import replace
        return replace(config, served_model_name="SmolLM2-135M-Instruct")
    return config


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from loraplex.scheduler.engine import Engine, freeze_heap
    from loraplex.server.app import create_app

    config = _demo_name(serve_config(args))
    setup_logging(config.log_format)
    engine = Engine(config.engine)
    app = create_app(engine, config)
    state = app.state.loraplex
    freeze_heap()  # the process's one engine: its set-up leaves the collector's scans

    class DrainingServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises the signal after shutting down (exit status -15); a drained,
            # orderly stop is a success, so we only route the signals to handle_exit.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {s: signal.signal(s, self.handle_exit)
                        for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

        def handle_exit(self, sig: int, frame: object) -> None:
            # SIGTERM/SIGINT: readiness goes 503 and new requests get 503 at once; uvicorn
            # then stops accepting and waits (up to the drain timeout) for open streams.
            state.bridge.draining = True
            super().handle_exit(sig, frame)

    server = DrainingServer(uvicorn.Config(
        app, host=config.host, port=config.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=int(config.drain_timeout_s) or None))
    logger.info("listening on http://%s:%d/v1 (model %s)", config.host, config.port,
                state.model_name)
    server.run()
    return 0


def generate(args: argparse.Namespace) -> int:
    from loraplex.model.sampler import SamplingParams
    from loraplex.scheduler.engine import Engine, freeze_heap

    setup_logging()
    engine = Engine(engine_config(args))
    for name, path in args.adapter:
        engine.add_adapter(name, path)
    freeze_heap()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            seed=args.seed)
    prompts = [p if args.raw else engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": p}]) for p in args.prompts]
    t0 = time.perf_counter()
    outputs = engine.generate(prompts, params, [args.use] * len(prompts))
    elapsed = time.perf_counter() - t0
    for prompt, out in zip(args.prompts, outputs):
        sys.stdout.write(f"> {prompt}\n{out.text}\n\n")
    logger.info("%d tokens in %.2f s", sum(len(o.token_ids) for o in outputs), elapsed)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "generate":
        return generate(args)
    return args.run(args)  # a client command


if __name__ == "__main__":
    sys.exit(main())
