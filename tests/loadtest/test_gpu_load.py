"""The in-process GPU load test, run with its tiny preset on the CPU: every request of the trace
(regenerated here from its config) finishes with exactly its tokens, one report row per rate,
the early stops, and a clean pool afterwards."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from loraplex.loadtest import gpu_load
from loraplex.loadtest.report import load_results
from loraplex.loadtest.results import RequestResult
from loraplex.loadtest.trace import TraceConfig, TraceRequest, generate_trace
from loraplex.scheduler.engine import Engine

RATES, DURATION_S, NUM_ADAPTERS, RANKS, SEED = (4.0, 8.0), 2.0, 6, (4, 8), 5
INPUT_LEN, OUTPUT_LEN, TINY_VOCAB = (4, 24), (3, 12), 512


def csv(values: tuple) -> str:
    return ",".join(f"{v:g}" for v in values)


def tiny_args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    return gpu_load.parse_args([
        "--tiny", "--device", "cpu", "--out", str(tmp_path / "out"),
        "--work-dir", str(tmp_path / "work"), "--rates", csv(RATES),
        "--duration", str(DURATION_S), "--num-adapters", str(NUM_ADAPTERS),
        "--ranks", csv(RANKS), "--input-len", csv(INPUT_LEN), "--output-len", csv(OUTPUT_LEN),
        "--seed", str(SEED), "--slo-ttft", "60", "--slo-tpot", "10", "--time-budget", "120",
        "--progress-s", "1", *extra])


def expected_trace(k: int) -> list[TraceRequest]:
    """The k-th rate's trace, from its documented config (seed + k), not from the tool."""
    return generate_trace(TraceConfig(
        num_adapters=NUM_ADAPTERS, rate=RATES[k], duration_s=DURATION_S, input_len=INPUT_LEN,
        output_len=OUTPUT_LEN, ranks=RANKS, seed=SEED + k, vocab_size=TINY_VOCAB))


def table_rows(report_md: Path) -> list[str]:
    return [line for line in report_md.read_text().splitlines() if line.startswith("| rate-")]


def assert_pages_all_free(engine: Engine) -> None:
    assert not engine.has_unfinished()
    assert engine.pool.num_kv_pages == 0, engine.pool.usage()
    assert engine.residency.num_evictable_pages() == engine.pool.num_adapter_pages  # no pins
    engine.residency.evict_idle(engine.pool.num_pages)
    assert engine.pool.num_free_pages == engine.pool.num_pages


def test_every_request_gets_exactly_its_tokens_and_the_pool_ends_clean(tmp_path: Path) -> None:
    summary, engine = gpu_load.run(tiny_args(tmp_path))
    out = tmp_path / "out"
    assert summary["stop_reason"] is None
    assert [row["rate"] for row in summary["rates"]] == list(RATES)
    for k, rate in enumerate(RATES):
        trace = expected_trace(k)
        assert trace, "a rate with no request checks nothing"
        results = load_results(out / f"results-rate-{rate:g}.jsonl")
        assert [r.index for r in results] == [r.index for r in trace]
        for req, res in zip(trace, results, strict=True):
            assert res.is_ok and res.error is None, res.error
            assert res.adapter == req.adapter and res.finish_reason == "length"
            assert res.num_prompt_tokens == len(req.prompt)
            assert res.num_output_tokens == len(res.chunk_times_s) == req.max_tokens
            assert res.arrival_s == pytest.approx(req.arrival_s)
            assert req.arrival_s <= res.sent_s <= res.first_token_s <= res.end_s
            assert res.chunk_times_s == sorted(res.chunk_times_s)
        row = json.loads((out / f"rate-{rate:g}.json").read_text())
        assert row["summary"]["num_ok"] == row["summary"]["num_requests"] == len(trace)
        assert row["summary"]["num_output_tokens"] == sum(r.max_tokens for r in trace)
        assert row["summary"]["slo_attainment"] == 1.0
        # Each rate starts with a cold device tier: every adapter it names is loaded once.
        assert row["engine"]["device_adapter_loads"] >= len({r.adapter for r in trace})
        assert row["pool_check"]["is_clean"], row["pool_check"]
    assert len(table_rows(out / "report.md")) == len(RATES)
    saved = json.loads((out / "summary.json").read_text())
    assert [row["rate"] for row in saved["rates"]] == list(RATES)
    assert_pages_all_free(engine)


def test_stops_at_the_first_rate_under_the_slo_target(tmp_path: Path) -> None:
    summary, engine = gpu_load.run(tiny_args(tmp_path, "--slo-ttft", "1e-6"))
    assert len(summary["rates"]) == 1 and "SLO attainment 0.0%" in summary["stop_reason"]
    assert len(table_rows(tmp_path / "out" / "report.md")) == 1
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["stop_reason"]
    assert_pages_all_free(engine)


def test_no_rate_starts_that_the_time_budget_cannot_hold(tmp_path: Path) -> None:
    summary, engine = gpu_load.run(tiny_args(tmp_path, "--time-budget", "1"))
    assert summary["rates"] == [] and summary["stop_reason"].startswith("time budget")
    assert table_rows(tmp_path / "out" / "report.md") == []
    assert_pages_all_free(engine)


def result(ttft_s: float, num_tokens: int, tpot_s: float) -> RequestResult:
    end = ttft_s + tpot_s * (num_tokens - 1)
    return RequestResult(index=0, adapter="a", tenant=None, arrival_s=0.0, first_token_s=ttft_s,
                         end_s=end, num_output_tokens=num_tokens, status=200)


def test_latency_slo_bounds_ttft_and_time_per_output_token() -> None:
    slo = gpu_load.LatencySLO(ttft_s=1.0, tpot_s=0.1)
    assert slo.is_met(result(0.5, 10, 0.09))
    assert not slo.is_met(result(0.5, 10, 0.11))
    assert not slo.is_met(result(1.5, 10, 0.01))
    assert slo.is_met(result(0.5, 1, 0.0))  # one token: no TPOT to bound
    failed = result(0.5, 10, 0.01)
    failed.error = "unfinished"
    assert not slo.is_met(failed)
    with pytest.raises(ValueError, match="tpot_s"):
        gpu_load.LatencySLO(tpot_s=0.0)
