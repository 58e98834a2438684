"""A load test's results → summary (throughput, TTFT/TPOT/e2e percentiles, SLO attainment,
adapter loads, errors), ratios against baselines, JSON, a Markdown table and PNG plots."""

from __future__ import annotations

import collections
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from loraplex.loadtest.results import RequestResult

logger = logging.getLogger(__name__)
QUANTILES = (50, 90, 99)


@dataclass(frozen=True, slots=True)
class SLO:
    """A request attains the SLO when every bound given holds (None: that bound is not set).
    Failed requests never attain it."""

    e2e_s: float | None = None
    ttft_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("e2e_s", "ttft_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name}: must be > 0 or None, got {value}")

    def is_met(self, r: RequestResult) -> bool:
        if not r.is_ok:
            return False
        if self.e2e_s is not None and r.e2e_s > self.e2e_s:
            return False
        return self.ttft_s is None or (r.ttft_s is not None and r.ttft_s <= self.ttft_s)


def percentiles(values: list[float], qs: tuple[int, ...] = QUANTILES) -> dict[str, float | None]:
    """`p50`… of `values` (numpy's linear interpolation); None for an empty list."""
    if not values:
        return {f"p{q}": None for q in qs}
    points = np.percentile(np.asarray(values, dtype=np.float64), qs)
    return {f"p{q}": float(v) for q, v in zip(qs, points)}


def summarize(results: list[RequestResult], name: str, slo: SLO = SLO(),
              adapter_loads: float | None = None) -> dict:
    """One run's numbers. Duration: first arrival to last completion."""
    ok = [r for r in results if r.is_ok]
    start = min((r.arrival_s for r in results), default=0.0)
    end = max((r.end_s for r in ok), default=start)
    duration = end - start
    num_tokens = sum(r.num_output_tokens for r in ok)
    errors = collections.Counter(r.error or f"HTTP {r.status}" for r in results if not r.is_ok)
    return {
        "name": name,
        "num_requests": len(results),
        "num_ok": len(ok),
        "num_errors": len(results) - len(ok),
        "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration > 0 else None,
        "output_tokens_per_s": num_tokens / duration if duration > 0 else None,
        "num_output_tokens": num_tokens,
        "ttft_s": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": percentiles([r.tpot_s for r in ok if r.tpot_s is not None]),
        "e2e_s": percentiles([r.e2e_s for r in ok]),
        "slo": {"e2e_s": slo.e2e_s, "ttft_s": slo.ttft_s},
        "slo_attainment": (sum(slo.is_met(r) for r in results) / len(results)
                           if results else None),
        "adapter_loads": adapter_loads,
        "errors": dict(errors.most_common(5)),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare(ours: dict, baseline: dict) -> dict:
    """Ours against one baseline: throughput ratios (ours / baseline, > 1 is better for us)
    and the p99 end-to-end latency ratio (ours / baseline, ≤ 1 is equal or better)."""
    return {
        "ours": ours["name"],
        "baseline": baseline["name"],
        "throughput_ratio": _ratio(ours["requests_per_s"], baseline["requests_per_s"]),
        "token_throughput_ratio": _ratio(ours["output_tokens_per_s"],
                                         baseline["output_tokens_per_s"]),
        "p99_e2e_ratio": _ratio(ours["e2e_s"]["p99"], baseline["e2e_s"]["p99"]),
        "p50_e2e_ratio": _ratio(ours["e2e_s"]["p50"], baseline["e2e_s"]["p50"]),
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _trio(points: dict[str, float | None], digits: int = 2) -> str:
    return " / ".join(_fmt(points[f"p{q}"], digits) for q in QUANTILES)


def markdown(summaries: list[dict], comparisons: list[dict] = (), notes: list[str] = ()) -> str:
    """The summaries as one table (latencies in seconds), the ratios as another."""
    lines = [("| run | requests (ok/all) | req/s | tok/s | TTFT p50 / p90 / p99 | "
              "TPOT p50 / p90 / p99 | e2e p50 / p90 / p99 | SLO | adapter loads |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        loads = "–" if s["adapter_loads"] is None else f"{s['adapter_loads']:.0f}"
        slo = "–" if s["slo_attainment"] is None else f"{100 * s['slo_attainment']:.1f}%"
        lines.append(f"| {s['name']} | {s['num_ok']}/{s['num_requests']} | "
                     f"{_fmt(s['requests_per_s'])} | {_fmt(s['output_tokens_per_s'], 1)} | "
                     f"{_trio(s['ttft_s'])} | {_trio(s['tpot_s'], 3)} | "
                     f"{_trio(s['e2e_s'])} | {slo} | {loads} |")
    if comparisons:
        lines += ["", ("| ours vs baseline | throughput × (req/s) | throughput × (tok/s) | "
                       "p99 e2e ours/baseline | p50 e2e ours/baseline |"), "|---|---|---|---|---|"]
        for c in comparisons:
            lines.append(f"| {c['ours']} vs {c['baseline']} | {_fmt(c['throughput_ratio'])} | "
                         f"{_fmt(c['token_throughput_ratio'])} | {_fmt(c['p99_e2e_ratio'])} | "
                         f"{_fmt(c['p50_e2e_ratio'])} |")
    slos = {(s["slo"]["e2e_s"], s["slo"]["ttft_s"]) for s in summaries}
    if len(slos) == 1:
        e2e, ttft = slos.pop()
        parts = [f"e2e ≤ {e2e:g} s" if e2e else "", f"TTFT ≤ {ttft:g} s" if ttft else ""]
        lines += ["", "SLO: " + (" and ".join(p for p in parts if p) or "none") + "."]
    errors = [f"{s['name']}: {s['errors']}" for s in summaries if s["errors"]]
    lines += [""] + [f"- {n}" for n in notes] + [f"- errors, {e}" for e in errors]
    return "\n".join(lines).rstrip() + "\n"


def plot(runs: dict[str, list[RequestResult]], out_dir: str | Path,
         bin_s: float = 2.0) -> list[Path]:
    """latency_cdf.png (TTFT and e2e per run) and throughput.png (output tokens/s over time);
    nothing, with a warning, when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter, ScalarFormatter
    except ImportError:
        logger.warning("matplotlib is not installed: no plots")
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, results in runs.items():
        for ax, key in zip(axes, ("ttft_s", "e2e_s")):
            values = np.sort([getattr(r, key) for r in results
                              if r.is_ok and getattr(r, key) is not None])
            if values.size:
                ax.plot(values, np.arange(1, values.size + 1) / len(results), label=name)
    for ax, title in zip(axes, ("time to first token", "end-to-end latency")):
        ax.set(title=title, xlabel="seconds", ylabel="fraction of requests", xscale="log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend()
    cdf = out_dir / "latency_cdf.png"
    fig.tight_layout()
    fig.savefig(cdf, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, results in runs.items():
        times = np.array([t for r in results if r.is_ok for t in r.chunk_times_s])
        if times.size:
            edges = np.arange(0.0, times.max() + bin_s, bin_s)
            counts, _ = np.histogram(times, bins=edges)
            ax.plot(edges[:-1] + bin_s / 2, counts / bin_s, label=name)
    ax.set(title="output throughput over time", xlabel="seconds since start",
           ylabel="streamed chunks (≈ tokens) / s")
    ax.grid(alpha=0.3)
    ax.legend()
    throughput = out_dir / "throughput.png"
    fig.tight_layout()
    fig.savefig(throughput, dpi=110)
    plt.close(fig)
    return [cdf, throughput]


def save_results(path: str | Path, results: list[RequestResult]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in results:
            f.write(json.dumps(r.to_json(), separators=(",", ":")) + "\n")
    return path


def load_results(path: str | Path) -> list[RequestResult]:
    with Path(path).open() as f:
        return [RequestResult.from_json(json.loads(line)) for line in f if line.strip()]


def write_report(out_dir: str | Path, summaries: list[dict], comparisons: list[dict],
                 runs: dict[str, list[RequestResult]], meta: dict | None = None,
                 notes: list[str] = ()) -> dict[str, Path]:
    """report.json, report.md, the plots, and each run's per-request results (JSONL)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = plot(runs, out_dir)
    files = {"json": out_dir / "report.json", "markdown": out_dir / "report.md"}
    for name, results in runs.items():
        files[f"results:{name}"] = save_results(out_dir / f"results-{name}.jsonl", results)
    files["json"].write_text(json.dumps({
        "meta": meta or {}, "summaries": summaries, "comparisons": comparisons,
        "notes": list(notes), "plots": [str(p) for p in pngs]}, indent=2))
    md = markdown(summaries, comparisons, notes)
    if pngs:
        md += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n"
    files["markdown"].write_text(md)
    for p in pngs:
        files[p.stem] = p
    return files
