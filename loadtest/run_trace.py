"""The S-LoRA load test in one command: adapters, trace, loraplex, then the two baselines
((a) peft set_adapter, (b) loraplex with one adapter per batch), then the report with ratios.

    python -m loraplex.loadtest.run_trace [--num-adapters 1000] [--rate 2] [--duration 60] \
        [--out DIR] [any other flag: passed to `loraplex serve`]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import httpx
from loraplex.loadtest.report import SLO, compare, markdown, summarize, write_report
from loraplex.loadtest.runner import RequestResult, RunnerConfig, run_trace, scrape_metric
from loraplex.loadtest.trace import TraceConfig, TraceRequest, generate_trace, save_trace
from loraplex.loadtest.workload import make_adapters
from loraplex.model.config import ModelConfig
from loraplex.model.weights import resolve_model_dir

logger = logging.getLogger("loraplex.loadtest")
LOAD_METRICS = ("loraplex_adapter_loads_total", "peft_adapter_loads_total")


class ServerStartError(RuntimeError):
    """A server subprocess exited or never became healthy; carries its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: Path,
                 start_timeout_s: float = 300.0):
        self.name, self.cmd, self.port, self.log_path = name, cmd, port, log_path
        self.start_timeout_s = start_timeout_s
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def log_tail(self, num_lines: int = 15) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() \
            if self.log_path.exists() else []
        return "\n".join(lines[-num_lines:])

    def __enter__(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log:
            log.write("$ " + " ".join(self.cmd) + "\n")
            log.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(f"{self.name} exited with status {self.proc.returncode}"
                                       f":\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise ServerStartError(f"{self.name} not healthy after {self.start_timeout_s:.0f} s:\n"
                               f"{self.log_tail()}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def base_model_name(url: str) -> str:
    """The served base model: the card of /v1/models without a parent."""
    cards = httpx.get(url + "/v1/models", timeout=30).json()["data"]
    return next(c["id"] for c in cards if not c.get("parent"))


def warm_up(url: str, model: str, num_requests: int = 2) -> None:
    """A few short base-model requests, so that one-time start-up costs stay out of the trace."""
    for _ in range(num_requests):
        resp = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": model, "prompt": "Hello there", "max_tokens": 4, "temperature": 0})
        resp.raise_for_status()


def run_server(server: ServerProcess, requests: list[TraceRequest], args: argparse.Namespace
               ) -> tuple[list[RequestResult], float | None]:
    """Start `server`, replay `requests`, stop it; (results, adapter loads during the trace)."""
    with server:
        model = base_model_name(server.url)
        warm_up(server.url, model)
        before = scrape_metric(server.url, LOAD_METRICS)
        logger.info("%s: %d requests over %.0f s", server.name, len(requests),
                    requests[-1].arrival_s if requests else 0)
        results = run_trace(requests, RunnerConfig(
            server.url, base_model=model, max_concurrency=args.max_concurrency,
            max_wall_s=args.max_run_s, progress=not args.no_progress), label=server.name)
        after = scrape_metric(server.url, LOAD_METRICS)
    loads = after - before if before is not None and after is not None else None
    return results, loads


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded demo model")
    p.add_argument("--num-adapters", type=int, default=1000)
    p.add_argument("--alpha", type=float, default=1.0, help="popularity exponent (Zipf)")
    p.add_argument("--rate", type=float, default=2.0, help="arrivals per second")
    p.add_argument("--cv", type=float, default=1.0, help="inter-arrival cv (1: Poisson)")
    p.add_argument("--duration", type=float, default=60.0, help="trace length, seconds")
    p.add_argument("--input-len", default="8,64", help="prompt tokens, LOW,HIGH")
    p.add_argument("--output-len", default="8,32", help="max_tokens, LOW,HIGH")
    p.add_argument("--ranks", default="8,16,32,64", help="rank mix")
    p.add_argument("--targets", default="q_proj,v_proj", help="adapted modules")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapter-root", type=Path,
                   default=Path.home() / ".cache/loraplex/loadtest-adapters",
                   help="random adapters are built (once) under ROOT/<model>/")
    p.add_argument("--out", type=Path, default=None,
                   help="report folder (default: loadtest-runs/<date-time>)")
    p.add_argument("--device", default="auto", help="for both servers: auto, cpu or cuda")
    p.add_argument("--max-concurrency", type=int, default=256)
    p.add_argument("--max-run-s", type=float, default=None,
                   help="cut each run after this long (default: duration + 90 s)")
    p.add_argument("--slo-e2e", type=float, default=10.0, help="end-to-end SLO, s")
    p.add_argument("--slo-ttft", type=float, default=None, help="TTFT SLO, s (default: none)")
    p.add_argument("--peft-duration", type=float, default=30.0,
                   help="baseline (a) runs the trace's first this-many seconds only")
    p.add_argument("--peft-max-loaded-adapters", type=int, default=64)
    p.add_argument("--skip-peft", action="store_true", help="no baseline (a)")
    p.add_argument("--skip-no-batching", action="store_true", help="no baseline (b)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _pair(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def make_trace(args: argparse.Namespace, vocab_size: int) -> tuple[TraceConfig, list]:
    config = TraceConfig(
        num_adapters=args.num_adapters, rate=args.rate, alpha=args.alpha, cv=args.cv,
        duration_s=args.duration, input_len=_pair(args.input_len),
        output_len=_pair(args.output_len), ranks=tuple(int(r) for r in args.ranks.split(",")),
        seed=args.seed, vocab_size=vocab_size)
    return config, generate_trace(config)


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def loraplex_cmd(model_dir: Path, adapter_dir: Path, port: int, device: str,
                 extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "loraplex.server.cli", "serve", "--model", str(model_dir),
            "--adapter-dir", str(adapter_dir), "--port", str(port), "--device", device,
            "--no-uploads", *extra]


def peft_cmd(model_dir: Path, adapter_dir: Path, port: int, device: str,
             max_loaded: int) -> list[str]:
    return [sys.executable, "-m", "loraplex.loadtest.peft_server", "--model", str(model_dir),
            "--adapter-dir", str(adapter_dir), "--port", str(port), "--device", device,
            "--max-loaded-adapters", str(max_loaded)]


def run_all(args: argparse.Namespace, extra: list[str], out: Path, model_dir: Path,
            adapter_dir: Path, trace: list[TraceRequest]
            ) -> tuple[dict[str, list[RequestResult]], dict[str, float | None], list[str]]:
    """Ours, then baseline (a) on the trace's prefix, then baseline (b); what fails is noted."""
    runs: dict[str, list[RequestResult]] = {}
    loads: dict[str, float | None] = {}
    notes: list[str] = []
    device = _device(args.device)
    plan = [("loraplex", loraplex_cmd(model_dir, adapter_dir, free_port(), device, extra),
             trace)]
    if not args.skip_peft:
        prefix = [r for r in trace if r.arrival_s < args.peft_duration]
        plan.append(("peft", peft_cmd(model_dir, adapter_dir, free_port(), device,
                                      args.peft_max_loaded_adapters), prefix))
    if not args.skip_no_batching:
        plan.append(("loraplex-1-adapter", loraplex_cmd(
            model_dir, adapter_dir, free_port(), device,
            [*extra, "--max-adapters-per-batch", "1"]), trace))
    for name, cmd, requests in plan:
        server = ServerProcess(name, cmd, int(cmd[cmd.index("--port") + 1]),
                               out / f"server-{name}.log")
        try:
            runs[name], loads[name] = run_server(server, requests, args)
        except ServerStartError as exc:
            rejected = "unrecognized arguments" in str(exc)
            notes.append(f"{name} did not run: the server "
                         f"{'rejected a flag' if rejected else 'failed to start'}: "
                         f"{str(exc).splitlines()[-1]} (log: {server.log_path.name})")
            logger.error("%s", exc)
    return runs, loads, notes


def summarize_all(runs: dict[str, list[RequestResult]], loads: dict[str, float | None],
                  slo: SLO, num_peft: int) -> tuple[list[dict], list[dict]]:
    summaries = {name: summarize(res, name, slo, loads[name]) for name, res in runs.items()}
    comparisons = []
    if "loraplex" in runs and "peft" in runs:
        # Same requests, same schedule: ours over the prefix baseline (a) ran (ours also had the
        # rest of the trace arriving meanwhile, which can only slow it down).
        prefix = summarize(runs["loraplex"][:num_peft], "loraplex[prefix]", slo)
        summaries["loraplex[prefix]"] = prefix
        comparisons.append(compare(prefix, summaries["peft"]))
    if "loraplex" in runs and "loraplex-1-adapter" in runs:
        comparisons.append(compare(summaries["loraplex"], summaries["loraplex-1-adapter"]))
    return list(summaries.values()), comparisons


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.max_run_s is None:
        args.max_run_s = args.duration + 90
    out = args.out or Path("loadtest-runs") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(args.model)
    config = ModelConfig.from_dir(model_dir)
    t0 = time.perf_counter()
    adapters = make_adapters(args.adapter_root / model_dir.name, config, args.num_adapters,
                             tuple(int(r) for r in args.ranks.split(",")),
                             tuple(args.targets.split(",")), seed=args.seed)
    logger.info("%d adapters ready in %.0f s", len(adapters), time.perf_counter() - t0)
    trace_config, trace = make_trace(args, config.vocab_size)
    missing = set(trace_config.adapter_names()) - set(adapters)
    assert not missing, f"trace names adapters that make_adapters did not build: {missing}"
    # Serve exactly the N adapters of this run, though ROOT may hold more from earlier runs.
    adapter_dir = out / "adapters"
    adapter_dir.mkdir(exist_ok=True)
    for name, path in adapters.items():
        link = adapter_dir / name
        if not link.exists():
            link.symlink_to(path.resolve(), target_is_directory=True)
    save_trace(out / "trace.jsonl", trace)
    runs, loads, notes = run_all(args, extra, out, model_dir, adapter_dir, trace)
    slo = SLO(e2e_s=args.slo_e2e, ttft_s=args.slo_ttft)
    num_peft = sum(r.arrival_s < args.peft_duration for r in trace)
    summaries, comparisons = summarize_all(runs, loads, slo, num_peft)
    if "peft" in runs:
        notes.insert(0, f"peft ran the trace's first {args.peft_duration:g} s ({num_peft} of "
                        f"{len(trace)} requests, same arrival times); its ratio compares it with "
                        "loraplex[prefix], loraplex's results for those same requests.")
    notes.append(f"each run is cut after {args.max_run_s:g} s; requests still open then count "
                 "as errors (unfinished) and miss the SLO.")
    meta = {"trace": trace_config.to_json(), "model": str(model_dir),
            "targets": args.targets, "server_flags": extra, "device": _device(args.device),
            "machine": f"{platform.machine()} {platform.processor()}, {os.cpu_count()} cpus",
            "python": platform.python_version(), "num_requests": len(trace)}
    files = write_report(out, summaries, comparisons, runs, meta, notes)
    sys.stdout.write(markdown(summaries, comparisons, notes))
    sys.stdout.write(f"\nreport: {files['markdown']}  json: {files['json']}\n")
    for key in ("latency_cdf", "throughput"):
        if key in files:
            sys.stdout.write(f"plot: {files[key]}\n")
    return 0 if "loraplex" in runs else 1


if __name__ == "__main__":
    sys.exit(main())
