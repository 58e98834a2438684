"""The S-LoRA load test without HTTP: a random Llama-3-8B-shaped model and N random PEFT adapters
on disk, then traces at rising rates against an in-process `Engine` until SLO attainment falls
under 90 %; results in `report.py`'s format. `python -m loraplex.loadtest.gpu_load [--tiny] ...`
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from loraplex.loadtest.random_model import model_shape, write_adapters, write_random_model
from loraplex.loadtest.trace import TraceConfig, TraceRequest, generate_trace
from loraplex.memory.config import MemoryConfig
from loraplex.model.config import parse_dtype
from loraplex.model.sampler import SamplingParams, SamplingParamsError
from loraplex.scheduler.config import SchedulerConfig
from loraplex.scheduler.engine import Engine, EngineConfig, freeze_heap
from loraplex.scheduler.errors import RequestError, UnknownAdapterError
from loraplex.scheduler.request import RequestOutput

from loraplex.loadtest import report
from loraplex.loadtest.results import RequestResult

logger = logging.getLogger("loraplex.loadtest.gpu_load")

PRESETS = {
    "full": ("--rates 2,4,8,16,32,64 --duration 20 --max-drain 10 --time-budget 200 "
             "--num-adapters 300 --ranks 8,16,32,64 --input-len 8,512 --output-len 8,256 "
             "--pool-gib 20 --host-cache-gib 4 --max-resident-adapters 128 --max-num-seqs 256 "
             "--max-batched-tokens 2048"),
    "tiny": ("--rates 4,8 --duration 2 --max-drain 10 --time-budget 60 --num-adapters 8 "
             "--ranks 4,8 --input-len 4,32 --output-len 4,16 --pool-gib 0.01 "
             "--host-cache-gib 0.00003 --max-resident-adapters 4 --max-num-seqs 16 "
             "--max-batched-tokens 128 --slo-ttft 10 --slo-tpot 1"),
}
"""Defaults, as flags that those of the command line override (`--tiny` picks the second)."""


@dataclass(frozen=True, slots=True)
class LatencySLO(report.SLO):
    """report.SLO plus a bound on the mean time per output token after the first (TPOT)."""

    tpot_s: float | None = None

    def __post_init__(self) -> None:
        report.SLO.__post_init__(self)
        if self.tpot_s is not None and not self.tpot_s > 0:
            raise ValueError(f"tpot_s: must be > 0 or None, got {self.tpot_s}")

    def is_met(self, r: RequestResult) -> bool:
        tpot = r.tpot_s  # None below two tokens: nothing to bound
        return report.SLO.is_met(self, r) and (self.tpot_s is None or tpot is None
                                               or tpot <= self.tpot_s)


# ---- the engine ----------------------------------------------------------------------------
def build_engine(args: argparse.Namespace, model_dir: Path) -> Engine:
    return Engine(EngineConfig(
        model=str(model_dir), dtype=args.dtype, device=args.device, load_tokenizer=False,
        cuda_graphs_prefill=args.cuda_graphs_prefill,
        memory=MemoryConfig(pool_bytes=int(args.pool_gib * 2**30), max_rank=max(args.ranks),
                            max_resident_adapters=args.max_resident_adapters,
                            host_cache_bytes=int(args.host_cache_gib * 2**30)),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_batched_tokens,
                                  max_num_seqs=args.max_num_seqs)))


def register_adapters(engine: Engine, adapters: dict[str, Path], num_threads: int) -> None:
    """Read and validate on threads (`prepare_adapter` is thread-safe), install in order."""
    names = list(adapters)
    with ThreadPoolExecutor(num_threads) as pool:
        for start in range(0, len(names), 4 * num_threads):
            chunk = names[start:start + 4 * num_threads]
            for prepared in pool.map(lambda n: engine.prepare_adapter(n, adapters[n]), chunk):
                engine.install_adapter(prepared)


def warm_up(engine: Engine, names: list[str], max_num_seqs: int, max_batched_tokens: int) -> None:
    """Decode batches of every size up to max_num_seqs in steps of 8 (CUDA graphs are captured
    and Triton kernels compiled at first use), so that one-time costs stay out of the rates."""
    names = names[:min(8, engine.config.memory.max_resident_adapters)]  # loaded in one step
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for size in sorted({1, 2, 4, *range(8, max_num_seqs + 1, 8), max_num_seqs}):
        length = max(1, min(8, max_batched_tokens // size))
        prompts = [[(7 * i + j) % engine.model_config.vocab_size for j in range(length)]
                   for i in range(size)]
        for out in engine.generate(prompts, params, [names[i % len(names)] for i in range(size)]):
            if out.error is not None:
                raise RuntimeError(f"warm-up request failed: {out.error!r}")
    engine.residency.evict_idle(engine.pool.num_pages)


# ---- one rate ------------------------------------------------------------------------------
def _track(peaks: dict, engine: Engine) -> tuple[int, int]:
    """Fold the engine's stats after a step into `peaks`; (running, waiting) now."""
    st = engine.stats()
    peaks["num_steps"] += 1
    peaks["max_running"] = max(peaks["max_running"], st.num_running)
    peaks["max_waiting"] = max(peaks["max_waiting"], st.num_waiting)
    peaks["max_kv_usage"] = max(peaks["max_kv_usage"], st.kv_usage)
    peaks["fetch_s"] += sum(load.seconds for load in st.adapter_loads  # the step waited
                            if load.number > peaks["last_load"])
    peaks["last_load"] = st.num_adapter_loads
    return st.num_running, st.num_waiting


def _submit(engine: Engine, req: TraceRequest, res: RequestResult, now: float, rid: str) -> bool:
    res.sent_s = now
    params = SamplingParams(max_tokens=req.max_tokens, temperature=0, ignore_eos=True)
    try:
        engine.add_request(req.prompt, params, req.adapter, rid, tenant=req.tenant or "")
    except (RequestError, UnknownAdapterError, SamplingParamsError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        return False
    res.status, res.num_prompt_tokens = 200, len(req.prompt)
    return True


def _fold(out: RequestOutput, res: RequestResult, now: float) -> None:
    """One step's output into the request's record: a timestamp per new token, then the end."""
    if out.new_token_ids and res.first_token_s is None:
        res.first_token_s = now
    res.chunk_times_s.extend([now] * len(out.new_token_ids))
    res.num_output_tokens = len(out.token_ids)
    if not out.finished:
        return
    res.finish_reason = out.finish_reason
    if out.error is None and out.finish_reason in ("length", "stop"):
        res.end_s = now
    else:
        res.error = f"{type(out.error).__name__}: {out.error}" if out.error is not None \
            else f"finished: {out.finish_reason}"


def replay(engine: Engine, trace: list[TraceRequest], label: str, cut_s: float,
           progress_s: float) -> tuple[list[RequestResult], dict]:
    """Add each request once its arrival time has passed (wall clock), step the engine; at
    `cut_s` abort what is still open (errors). One result per request, in trace order."""
    results = {r.index: RequestResult(index=r.index, adapter=r.adapter, tenant=r.tenant,
                                      arrival_s=r.arrival_s) for r in trace}
    queue, open_ids = deque(sorted(trace, key=lambda r: r.arrival_s)), {}
    peaks = dict.fromkeys(("num_steps", "max_running", "max_waiting", "max_kv_usage",
                           "fetch_s"), 0)
    peaks["last_load"] = engine.stats().num_adapter_loads  # loads before this rate: not its own
    t0, next_log = time.monotonic(), progress_s
    while (queue or open_ids) and (now := time.monotonic() - t0) < cut_s:
        while queue and queue[0].arrival_s <= now:
            req = queue.popleft()
            if _submit(engine, req, results[req.index], now, rid := f"{label}-{req.index}"):
                open_ids[rid] = results[req.index]
        if not open_ids:
            time.sleep(max(0.0, min(queue[0].arrival_s, cut_s) - now) if queue else 0.0)
            continue
        outputs = engine.step()
        now = time.monotonic() - t0
        for out in outputs:
            if (res := open_ids.get(out.request_id)) is None:
                logger.warning("%s: output for %s, not open", label, out.request_id)
                continue
            _fold(out, res, now)
            if out.finished:
                del open_ids[out.request_id]
        running, waiting = _track(peaks, engine)
        if now >= next_log:
            next_log += progress_s
            logger.info("%s: %5.1f s, %d/%d finished, %d running, %d waiting", label, now,
                        len(trace) - len(queue) - len(open_ids), len(trace), running, waiting)
    for rid, res in open_ids.items():
        engine.abort(rid)
        res.error, res.end_s = f"unfinished: cut after {cut_s:.0f} s", None
    for req in queue:
        results[req.index].error = f"unfinished: never sent (cut after {cut_s:.0f} s)"
    peaks.pop("last_load")
    return [results[i] for i in sorted(results)], peaks


def pool_check(engine: Engine) -> dict:
    """After a rate: nothing open, no KV page held, no adapter pinned; idle adapters are then
    evicted (the next rate starts with a cold device tier) and every page must be free."""
    st = engine.stats()
    pinned = engine.pool.num_adapter_pages - engine.residency.num_evictable_pages()
    engine.residency.evict_idle(engine.pool.num_pages)
    free = engine.pool.num_free_pages
    return {"has_unfinished": engine.has_unfinished(), "kv_pages": st.num_kv_pages,
            "pinned_adapter_pages": pinned, "free_pages_after_evict": free,
            "num_pages": st.num_pages, "is_clean": not engine.has_unfinished()
            and st.num_kv_pages == 0 and pinned == 0 and free == st.num_pages}


def run_rate(engine: Engine, args: argparse.Namespace, k: int, cut_s: float,
             slo: LatencySLO) -> tuple[dict, list[RequestResult]]:
    """A fresh trace at `args.rates[k]` (seed `args.seed + k`); its row for summary.json."""
    rate = args.rates[k]
    trace = generate_trace(TraceConfig(
        num_adapters=args.num_adapters, rate=rate, alpha=args.alpha, cv=args.cv,
        duration_s=args.duration, input_len=args.input_len, output_len=args.output_len,
        ranks=args.ranks, seed=args.seed + k, vocab_size=engine.model_config.vocab_size))
    name, before, t0 = f"rate-{rate:g}", engine.stats(), time.monotonic()
    results, peaks = replay(engine, trace, name, cut_s, args.progress_s)
    wall_s, after = time.monotonic() - t0, engine.stats()
    summary = report.summarize(results, name, slo,
                               after.device_adapter_loads - before.device_adapter_loads)
    summary["slo"]["tpot_s"] = slo.tpot_s
    counters = {key: getattr(after, key) - getattr(before, key) for key in (
        "device_adapter_loads", "host_cache_hits", "host_cache_misses", "host_prefetches",
        "host_blocking_reads", "num_preemptions")}
    return {"rate": rate, "trace_rate": len(trace) / args.duration, "wall_s": wall_s,
            "summary": summary, "engine": {**counters, **peaks},
            "pool_check": pool_check(engine)}, results


# ---- reports -------------------------------------------------------------------------------
def _engine_line(row: dict) -> str:
    e = row["engine"]
    return (f"{row['summary']['name']}: trace {row['trace_rate']:.2f} req/s, {e['num_steps']} "
            f"steps, peak {e['max_running']} running / {e['max_waiting']} waiting, KV "
            f"{e['max_kv_usage']:.0%}; {e['device_adapter_loads']} device loads (host tier "
            f"{e['host_cache_hits']} hits, {e['host_cache_misses']} misses; steps waited "
            f"{e['fetch_s']:.2f} s), {e['num_preemptions']} preemptions; pages free after: "
            f"{row['pool_check']['is_clean']}.")


def write_outputs(out: Path, meta: dict, rows: list[dict], runs: dict, notes: list[str]) -> None:
    """report.md/.json, results-*.jsonl and plots (by report.py), rate-*.json, summary.json."""
    notes = [*notes, *(_engine_line(row) for row in rows)]
    if meta["stop_reason"]:
        notes.append(f"stopped: {meta['stop_reason']}.")
    if rows:
        report.write_report(out, [r["summary"] for r in rows], [], runs, meta, notes)
    else:  # nothing to plot
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(report.markdown([], [], notes))
    for row in rows:
        (out / f"{row['summary']['name']}.json").write_text(json.dumps(row, indent=1))
    (out / "summary.json").write_text(json.dumps({**meta, "rates": rows}, indent=1))


def _meta(args: argparse.Namespace, engine: Engine, timings: dict) -> tuple[dict, list[str]]:
    """What summary.json says of the run, and the report's notes."""
    mc = engine.model_config
    name = torch.cuda.get_device_name() if engine.device.type == "cuda" else platform.machine()
    shape = (f"hidden {mc.hidden_size}, intermediate {mc.intermediate_size}, {mc.num_layers} "
             f"layers, {mc.num_heads}/{mc.num_kv_heads} heads of {mc.head_dim}, vocab "
             f"{mc.vocab_size}")
    meta = {"device": f"{engine.device.type} ({name}, {os.cpu_count()} cpus)", "shape": shape,
            "torch": torch.__version__, "num_pages": engine.pool.num_pages,
            "page_bytes": engine.pool.page_bytes, "setup_s": timings, "stop_reason": None,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    notes = [(f"rate-R: arrivals at R req/s (cv {args.cv:g}) for {args.duration:g} s over "
              f"{args.num_adapters} adapters (popularity alpha {args.alpha:g}, ranks "
              f"{args.ranks} on {'+'.join(args.targets)}), then at most {args.max_drain:g} s to "
              "drain: what is still open then is an error (unfinished)."),
             (f"model: random {args.dtype} Llama ({shape}); in-process engine on "
              f"{meta['device']}, no HTTP; greedy, ignore_eos."),
             f"the SLO also bounds TPOT ≤ {args.slo_tpot:g} s."]
    return meta, notes


# ---- the command line ----------------------------------------------------------------------
def _numbers(kind: type) -> Callable[[str], tuple]:
    return lambda text: tuple(kind(x) for x in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter,
                                epilog="\n\n".join(f"{k}: {v}" for k, v in PRESETS.items()))
    p.add_argument("--tiny", action="store_true", help="tiny model and CPU-sized defaults")
    p.add_argument("--out", type=Path, default=None, help="default gpu_load_runs/<date-time>")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/gpu_load_work"),
                   help="where the random model and adapters are written (reused later)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--num-layers", type=int, default=None, help="fewer layers than the shape's")
    for flag, kind, text in (
            ("--rates", _numbers(float), "offered req/s, in order"),
            ("--duration", float, "s of arrivals per rate"),
            ("--max-drain", float, "s after the last arrival before a rate is cut"),
            ("--time-budget", float, "s from start; a rate starts only if `duration` fits"),
            ("--num-adapters", int, ""), ("--ranks", _numbers(int), "rank mix"),
            ("--input-len", _numbers(int), "LOW,HIGH"), ("--output-len", _numbers(int), ""),
            ("--pool-gib", float, "page pool (KV + adapters)"), ("--host-cache-gib", float, ""),
            ("--max-resident-adapters", int, ""), ("--max-num-seqs", int, ""),
            ("--max-batched-tokens", int, "")):
        p.add_argument(flag, type=kind, default=None, help=f"{text} (preset below)".lstrip())
    p.add_argument("--targets", type=lambda t: tuple(t.split(",")), default=("q_proj", "v_proj"))
    p.add_argument("--alpha", type=float, default=1.0, help="adapter popularity exponent")
    p.add_argument("--cv", type=float, default=1.0, help="inter-arrival cv (1: Poisson)")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="s to the first token (%(default)s)")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="s per output token after it (%(default)s)")
    p.add_argument("--slo-e2e", type=float, default=None, help="s end to end (default none)")
    p.add_argument("--slo-target", type=float, default=0.9, help="stop below this attainment (%(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress-s", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=8, help="for writing and reading files")
    p.add_argument("--cuda-graphs-prefill", action="store_true", help="graphs of prefill steps")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    preset = PRESETS["tiny" if parser.parse_args(argv).tiny else "full"]
    args = parser.parse_args(preset.split() + argv)  # the later flag wins
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.out = args.out or Path("gpu_load_runs") / time.strftime("%Y%m%d-%H%M%S")
    return args


def _timed(timings: dict, name: str, fn: Callable[[], object]) -> object:
    t0 = time.monotonic()
    value = fn()
    timings[name] = round(time.monotonic() - t0, 2)
    logger.info("%s: %.1f s", name, timings[name])
    return value


def setup(args: argparse.Namespace, timings: dict, freeze: bool = False) -> Engine:
    """Model and adapters on disk (reused when there), the engine, registration, warm-up;
    with `freeze`, then `freeze_heap()` as `loraplex serve` does (a process of one engine)."""
    shape = model_shape(args.tiny, args.num_layers)
    dtype, gen = parse_dtype(args.dtype), torch.Generator(args.device).manual_seed(args.seed)
    key = "-".join(str(v) for v in (*shape.values(), args.dtype, args.seed))
    model_dir = _timed(timings, "model_write_s", lambda: write_random_model(
        args.work_dir / f"model-{key}", shape, dtype, gen, args.threads))
    engine = _timed(timings, "engine_load_s", lambda: build_engine(args, model_dir))
    adapters = _timed(timings, "adapters_write_s", lambda: write_adapters(
        args.work_dir / f"adapters-{key}-{'+'.join(args.targets)}", engine.model_config,
        args.num_adapters, args.ranks, args.targets, dtype, gen, args.seed, args.threads))
    _timed(timings, "register_s", lambda: register_adapters(engine, adapters, args.threads))
    _timed(timings, "warm_up_s", lambda: warm_up(engine, list(adapters), args.max_num_seqs,
                                                 args.max_batched_tokens))
    if freeze:
        freeze_heap()
    return engine


def run(args: argparse.Namespace, freeze: bool = False) -> tuple[dict, Engine]:
    """Setup, then the rates in order until attainment < slo_target or the time budget ends;
    the outputs are rewritten after each rate. (summary.json's content, the closed engine)"""
    deadline, timings = time.monotonic() + args.time_budget, {}
    engine = setup(args, timings, freeze)
    slo = LatencySLO(e2e_s=args.slo_e2e, ttft_s=args.slo_ttft, tpot_s=args.slo_tpot)
    (meta, notes), rows, runs = _meta(args, engine, timings), [], {}
    for k, rate in enumerate(args.rates):
        if (left := deadline - time.monotonic()) < args.duration:
            meta["stop_reason"] = f"time budget: {left:.0f} s left before rate-{rate:g}"
            write_outputs(args.out, meta, rows, runs, notes)
            break
        try:
            row, runs[f"rate-{rate:g}"] = run_rate(
                engine, args, k, min(args.duration + args.max_drain, left), slo)
        except Exception as exc:  # any engine failure: keep what the rates before gave
            logger.exception("rate-%g failed", rate)
            meta["stop_reason"] = f"rate-{rate:g} raised {type(exc).__name__}: {exc}"
            write_outputs(args.out, meta, rows, runs, notes)
            break
        rows.append(row)
        attainment = row["summary"]["slo_attainment"]
        if attainment is not None and attainment < args.slo_target:
            meta["stop_reason"] = f"rate-{rate:g}: SLO attainment {attainment:.1%}"
        write_outputs(args.out, meta, rows, runs, notes)  # after each rate: a kill keeps them
        if meta["stop_reason"]:
            break
    engine.close()
    return {**meta, "rates": rows}, engine


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for quiet in ("loraplex.model.adapters.peft", "loraplex.scheduler.engine"):
        logging.getLogger(quiet).setLevel(logging.WARNING)  # a line per adapter read
    args = parse_args(argv)
    if args.tiny and args.device == "cpu":
        torch.set_num_threads(1)  # tiny matrices: more threads only fight over the cores
    summary, _ = run(args, freeze=True)
    sys.stdout.write((args.out / "report.md").read_text())
    logger.info("stopped: %s; results in %s", summary["stop_reason"] or "all rates ran",
                args.out)
    return 0 if summary["rates"] else 1


if __name__ == "__main__":
    sys.exit(main())
