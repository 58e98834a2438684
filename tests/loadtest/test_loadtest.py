"""The load-test tooling: trace statistics, report arithmetic, the runner against a real loraplex
server, and the peft baseline server against the offline engine (official `openai` client)."""

from __future__ import annotations

import collections
import itertools
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from loraplex.loadtest.peft_server import PeftBackend, create_app
from loraplex.loadtest.report import (
    SLO,
    compare,
    load_results,
    markdown,
    percentiles,
    plot,
    save_results,
    summarize,
)
from loraplex.loadtest.runner import RequestResult, RunnerConfig, run_trace, scrape_metric
from loraplex.loadtest.trace import (
    TraceConfig,
    TraceRequest,
    arrival_stats,
    estimate_alpha,
    generate_trace,
    load_trace,
    save_trace,
)
from loraplex.loadtest.workload import make_adapters
from loraplex.model.config import ModelConfig
from loraplex.model.sampler import SamplingParams
from loraplex.scheduler.engine import Engine

from tests.server.conftest import (
    MODEL_NAME,
    chat_model,
    engine_config,
    free_port,
    start_server,
    write_keys,
)

__all__ = ["chat_model"]  # the session fixture, imported so that this folder sees it
NUM_ADAPTERS, RANKS = 12, (4, 8, 16)


# ---- traces -------------------------------------------------------------------------------
@pytest.mark.parametrize("cv", [1.0, 0.5, 2.0])
def test_trace_rate_cv_and_popularity_match_config(cv):
    config = TraceConfig(num_adapters=40, rate=25.0, alpha=1.0, cv=cv, num_requests=30_000,
                         input_len=(1, 2), output_len=(3, 9), seed=3)
    trace = generate_trace(config)
    assert len(trace) == 30_000
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(trace))
    rate, measured_cv = arrival_stats(trace)
    assert rate == pytest.approx(25.0, rel=0.03)
    assert measured_cv == pytest.approx(cv, rel=0.06)
    counts = collections.Counter(r.adapter for r in trace)
    assert set(counts) <= set(config.adapter_names())
    assert estimate_alpha([counts[n] for n in config.adapter_names()]) == pytest.approx(1.0,
                                                                                       abs=0.05)
    lengths = [r.max_tokens for r in trace]
    assert min(lengths) == 3 and max(lengths) == 9


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_popularity_exponent_is_recovered(alpha):
    config = TraceConfig(num_adapters=30, rate=10.0, alpha=alpha, num_requests=20_000,
                         input_len=(1, 1), seed=11)
    counts = collections.Counter(r.adapter for r in generate_trace(config))
    assert estimate_alpha([counts[n] for n in config.adapter_names()]) == pytest.approx(
        alpha, abs=0.06)


def test_trace_is_deterministic_and_round_trips(tmp_path):
    config = TraceConfig(num_adapters=100, rate=5.0, duration_s=600.0, cv=1.5, seed=42,
                         tenants=(("quiet", 1.0), ("flood", 10.0)), vocab_size=1000)
    trace = generate_trace(config)
    assert trace == generate_trace(config)
    assert trace != generate_trace(TraceConfig(**{**config.to_json(), "seed": 43}))
    assert all(0 <= r.arrival_s < 600.0 for r in trace) and trace[-1].arrival_s > 590
    assert all(all(100 <= t < 1000 for t in r.prompt) for r in trace)
    tenants = collections.Counter(r.tenant for r in trace)
    assert tenants["flood"] / tenants["quiet"] == pytest.approx(10.0, rel=0.3)
    assert [r.index for r in trace] == list(range(len(trace)))
    assert load_trace(save_trace(tmp_path / "t.jsonl", trace)) == trace
    text = generate_trace(TraceConfig(num_adapters=3, rate=1.0, num_requests=5,
                                      prompt_kind="text", input_len=(4, 4)))
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == 4 for r in text)
    assert load_trace(save_trace(tmp_path / "text.jsonl", text)) == text


def test_trace_config_refuses_bad_values():
    with pytest.raises(ValueError, match="duration_s / num_requests"):
        TraceConfig(num_adapters=1, rate=1.0)
    with pytest.raises(ValueError, match="cv"):
        TraceConfig(num_adapters=1, rate=1.0, cv=0.0, num_requests=1)
    with pytest.raises(ValueError, match="input_len"):
        TraceConfig(num_adapters=1, rate=1.0, num_requests=1, input_len=(5, 2))


# ---- report -------------------------------------------------------------------------------
def synthetic_results(n: int, seed: int = 0) -> list[RequestResult]:
    rng = np.random.default_rng(seed)
    results = []
    for i in range(n):
        arrival = float(i) * 0.1
        ttft = float(rng.uniform(0.01, 2.0))
        num_tokens = int(rng.integers(1, 20))
        gaps = rng.uniform(0.01, 0.2, num_tokens - 1)
        chunks = list(arrival + ttft + np.concatenate([[0.0], np.cumsum(gaps)]))
        results.append(RequestResult(index=i, adapter=f"a{i % 3}", tenant=None,
                                     arrival_s=arrival, sent_s=arrival,
                                     first_token_s=chunks[0], end_s=chunks[-1],
                                     num_output_tokens=num_tokens, chunk_times_s=chunks,
                                     status=200))
    results.append(RequestResult(index=n, adapter="a0", tenant=None, arrival_s=0.5,
                                 status=404, error="The model `x` does not exist."))
    return results


def test_report_percentiles_and_slo_match_numpy(tmp_path):
    results = synthetic_results(500)
    ok = [r for r in results if r.is_ok]
    s = summarize(results, "run", SLO(e2e_s=2.0), adapter_loads=7)
    for key, values in (("ttft_s", [r.ttft_s for r in ok]), ("e2e_s", [r.e2e_s for r in ok]),
                        ("tpot_s", [r.tpot_s for r in ok if r.num_output_tokens > 1])):
        for q in (50, 90, 99):
            assert s[key][f"p{q}"] == pytest.approx(np.percentile(values, q), rel=1e-12)
    assert (s["num_requests"], s["num_ok"], s["num_errors"]) == (501, 500, 1)
    duration = max(r.end_s for r in ok)
    assert s["duration_s"] == pytest.approx(duration)
    assert s["requests_per_s"] == pytest.approx(500 / duration)
    assert s["output_tokens_per_s"] == pytest.approx(sum(r.num_output_tokens for r in ok)
                                                     / duration)
    assert s["slo_attainment"] == pytest.approx(sum(r.e2e_s <= 2.0 for r in ok) / 501)
    both = summarize(results, "run", SLO(e2e_s=2.0, ttft_s=1.0))
    assert both["slo_attainment"] == pytest.approx(
        sum(r.e2e_s <= 2.0 and r.ttft_s <= 1.0 for r in ok) / 501)
    assert s["errors"] == {"The model `x` does not exist.": 1}
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}
    shifted = [_shifted(r, 1.0) for r in results]
    slower = summarize(shifted, "slow", SLO(e2e_s=2.0))
    c = compare(s, slower)
    assert c["p99_e2e_ratio"] == pytest.approx(s["e2e_s"]["p99"] / slower["e2e_s"]["p99"])
    assert c["p99_e2e_ratio"] < 1 and c["throughput_ratio"] > 1
    table = markdown([s, slower], [c], ["a note"])
    assert "| run | 500/501 |" in table and "run vs slow" in table and "a note" in table
    assert load_results(save_results(tmp_path / "r.jsonl", results)) == results
    pytest.importorskip("matplotlib")
    pngs = plot({"run": results, "slow": shifted}, tmp_path)
    assert [p.name for p in pngs] == ["latency_cdf.png", "throughput.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def _shifted(r: RequestResult, delay: float) -> RequestResult:
    if not r.is_ok:
        return r
    return RequestResult.from_json({
        **r.to_json(), "first_token_s": r.first_token_s + delay, "end_s": r.end_s + delay,
        "chunk_times_s": [t + delay for t in r.chunk_times_s]})


# ---- a real loraplex server ---------------------------------------------------------------
@pytest.fixture(scope="module")
def adapters(chat_model, tmp_path_factory) -> dict[str, Path]:
    _, model_dir = chat_model
    root = tmp_path_factory.mktemp("loadtest-adapters")
    return make_adapters(root, ModelConfig.from_dir(model_dir), NUM_ADAPTERS, RANKS,
                         ("q_proj", "v_proj", "down_proj"), seed=5)


@pytest.fixture(scope="module")
def offline(chat_model, adapters) -> Engine:
    _, model_dir = chat_model
    engine = Engine(engine_config(model_dir))
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine


def expected_text(offline: Engine, prompt: str | list[int], adapter: str | None,
                  max_tokens: int, ignore_eos: bool = True) -> str:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos)
    return offline.generate([prompt], params, [adapter])[0].text


def test_runner_against_loraplex_server(chat_model, adapters, offline):
    _, model_dir = chat_model
    root = next(iter(adapters.values())).parent
    config = TraceConfig(num_adapters=NUM_ADAPTERS, rate=40.0, num_requests=40, alpha=0.8,
                         input_len=(3, 12), output_len=(2, 8), ranks=RANKS, seed=9,
                         vocab_size=49152, tenants=(("t1", 1.0), ("t2", 1.0)))
    trace = generate_trace(config)
    trace.append(TraceRequest(index=len(trace), arrival_s=0.2, adapter="no-such-adapter",
                              prompt=[5, 6, 7], max_tokens=3))
    srv = start_server(model_dir, adapter_dirs=(root,))
    try:
        before = scrape_metric(srv.url, ("loraplex_adapter_loads_total",))
        results = run_trace(trace, RunnerConfig(srv.url + "/v1", max_concurrency=8,
                                                progress=False))
        after = scrape_metric(srv.url, ("loraplex_adapter_loads_total",))
    finally:
        srv.stop()
    assert [r.index for r in results] == [r.index for r in trace]
    bad = results.pop()
    assert (bad.status, bad.is_ok) == (404, False) and "does not exist" in bad.error
    for req, res in zip(trace, results):
        assert res.is_ok, res.error
        assert res.num_output_tokens == req.max_tokens  # ignore_eos, counted from usage
        assert (res.adapter, res.tenant) == (req.adapter, req.tenant)
        assert res.arrival_s <= res.sent_s <= res.first_token_s <= res.end_s
        assert res.chunk_times_s == sorted(res.chunk_times_s)
        assert res.sent_s - res.arrival_s < 2.0  # dispatched on schedule
    for req, res in list(zip(trace, results))[::5]:  # greedy parity on a sample
        assert res.text == expected_text(offline, req.prompt, req.adapter, req.max_tokens)
    assert before is not None and after - before >= 1
    s = summarize(results, "loraplex", SLO(e2e_s=30.0), after - before)
    assert s["num_ok"] == 40 and s["slo_attainment"] == 1.0


def test_runner_cuts_a_run_at_max_wall_s(chat_model, adapters):
    _, model_dir = chat_model
    root = next(iter(adapters.values())).parent
    name = min(adapters)
    trace = [TraceRequest(index=0, arrival_s=0.0, adapter=name, prompt=[9, 10], max_tokens=2),
             TraceRequest(index=1, arrival_s=30.0, adapter=name, prompt=[9, 10], max_tokens=2)]
    srv = start_server(model_dir, adapter_dirs=(root,))
    try:
        t0 = time.monotonic()
        results = run_trace(trace, RunnerConfig(srv.url, max_wall_s=3.0, progress=False))
        assert time.monotonic() - t0 < 10
    finally:
        srv.stop()
    assert results[0].is_ok and results[0].num_output_tokens == 2
    assert not results[1].is_ok and results[1].error.startswith("unfinished")


def test_runner_sends_each_tenants_key(chat_model, adapters, tmp_path):
    _, model_dir = chat_model
    root = next(iter(adapters.values())).parent
    keys = write_keys(tmp_path / "keys.json", {"acme": {"keys": ["sk-acme"]},
                                                "zeta": {"keys": ["sk-zeta"]}})
    trace = generate_trace(TraceConfig(num_adapters=NUM_ADAPTERS, rate=20.0, num_requests=6,
                                       ranks=RANKS, output_len=(2, 3), vocab_size=49152,
                                       tenants=(("acme", 1.0), ("zeta", 1.0))))
    srv = start_server(model_dir, adapter_dirs=(root,), api_keys=keys)
    try:
        keyed = run_trace(trace, RunnerConfig(
            srv.url, api_keys=(("acme", "sk-acme"), ("zeta", "sk-zeta")), progress=False))
        wrong = run_trace(trace[:2], RunnerConfig(srv.url, default_api_key="sk-nobody",
                                                  progress=False))
    finally:
        srv.stop()
    assert all(r.is_ok for r in keyed), [r.error for r in keyed]
    assert {r.tenant for r in keyed} == {"acme", "zeta"}
    assert [r.status for r in wrong] == [401, 401]


# ---- baseline (a): the peft server --------------------------------------------------------
@pytest.fixture(scope="module")
def peft_url(chat_model, adapters):
    _, model_dir = chat_model
    backend = PeftBackend(model_dir, adapters, max_loaded_adapters=2)
    server = uvicorn.Server(uvicorn.Config(create_app(backend, MODEL_NAME), host="127.0.0.1",
                                           port=free_port(), log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(url + "/health").status_code == 200
    yield url, backend
    server.should_exit = True
    thread.join(30)


def test_peft_server_equals_offline_engine(peft_url, offline, adapters):
    url, backend = peft_url
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    names = sorted(adapters)
    assert {m.id for m in client.models.list()} == {MODEL_NAME, *names}
    # four adapters with room for two: later ones evict earlier ones, then come back
    for model in (MODEL_NAME, names[0], names[1], names[2], names[3], names[0]):
        adapter = None if model == MODEL_NAME else model
        prompt = "Write one line about page tables."
        want = expected_text(offline, prompt, adapter, 10, ignore_eos=False)
        resp = client.completions.create(model=model, prompt=prompt, max_tokens=10,
                                         temperature=0)
        assert resp.choices[0].text == want
        chunks = list(client.completions.create(
            model=model, prompt=[11, 12, 13, 14], max_tokens=7, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == expected_text(offline, [11, 12, 13, 14], adapter, 7)
        assert chunks[-1].usage.completion_tokens == 7
    assert backend.num_loads == 5 and len(backend.loaded) == 2
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)


def test_runner_drives_the_peft_server(peft_url, adapters):
    url, _ = peft_url
    trace = generate_trace(TraceConfig(num_adapters=NUM_ADAPTERS, rate=50.0, num_requests=6,
                                       ranks=RANKS, output_len=(24, 24), vocab_size=49152))
    results = run_trace(trace, RunnerConfig(url, progress=False))
    assert all(r.is_ok for r in results), [r.error for r in results]
    assert [r.num_output_tokens for r in results] == [r.max_tokens for r in trace]
    # one at a time: a request's first token comes after the previous one's last
    spans = sorted((r.first_token_s, r.end_s) for r in results)
    assert all(a[1] <= b[0] + 0.02 for a, b in itertools.pairwise(spans)), spans
    assert scrape_metric(url, ("loraplex_adapter_loads_total", "peft_adapter_loads_total")) >= 1
