"""`Metrics` driven by real engine snapshots; checked through prometheus-client's own text parser.

Also checks the Grafana dashboard: every query names only series that `Metrics` exports.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from loraplex.memory.config import MemoryConfig
from loraplex.model.sampler import SamplingParams
from loraplex.scheduler.config import SchedulerConfig
from loraplex.scheduler.engine import Engine, EngineConfig, RequestOutput
from loraplex.server.metrics import OTHER, Metrics
from tests.adapter_factory import AdapterSpec, make_peft_adapter
from tests.conftest import assert_pool_clean, make_engine

ARCH = "llama"
NUM_ADAPTERS = 5
PROMPT = [3, 4, 5, 6, 7, 8, 9, 10] * 2
DASHBOARD = Path(__file__).parents[2] / "server" / "grafana" / "loraplex.json"
Samples = dict[tuple[str, frozenset], float]
Dirs = tuple[Path, list[Path]]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def dirs(tiny_model_dir: Callable, tmp_path_factory: pytest.TempPathFactory) -> Dirs:
    base, model_dir = tiny_model_dir(ARCH)
    adapters = [make_peft_adapter(base, AdapterSpec("lora", 8, 16, ("q_proj", "v_proj"), seed=i),
                                  tmp_path_factory.mktemp(f"a{i}")) for i in range(NUM_ADAPTERS)]
    return model_dir, adapters


def register(engine: Engine, adapters: list[Path]) -> None:
    for i, path in enumerate(adapters):
        engine.add_adapter(f"a{i}", path)


def tight_engine(model_dir: Path) -> Engine:
    """20 pages, 3 adapter slots, a host tier for 3 adapters: preempts, evicts, loads from both."""
    return Engine(EngineConfig(
        model=str(model_dir), dtype="float32", device="cpu", load_tokenizer=False,
        memory=MemoryConfig(page_size=16, num_pages=20, max_rank=64, max_resident_adapters=3,
                            host_cache_bytes=3 * 14336),
        scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=64)))


def parse(metrics: Metrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def series(samples: Samples, name: str) -> dict[frozenset, float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def running_by_adapter(engine: Engine) -> dict[str, int]:
    """Read straight from the scheduler's running list, not from `Engine.stats`."""
    counts: dict[str, int] = {}
    for seq in engine.scheduler.running:
        if seq.request.adapter is not None:
            counts[seq.request.adapter.name] = counts.get(seq.request.adapter.name, 0) + 1
    return counts


def drive(engine: Engine, metrics: Metrics, adapters: list[str | None], max_tokens: int,
          on_step: Callable[[], None] | None = None) -> list[RequestOutput]:
    """Submit one request per entry, step to the end feeding `metrics` as the server will."""
    arrival, last_token, first = {}, {}, {}
    names = {}
    for adapter in adapters:
        rid = engine.add_request(PROMPT, greedy(max_tokens), adapter)
        arrival[rid], names[rid] = time.perf_counter(), adapter
    finished = []
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            for _ in out.new_token_ids:
                if out.request_id in first:
                    metrics.observe_tpot(now - last_token[out.request_id])
                else:
                    first[out.request_id] = now - arrival[out.request_id]
                last_token[out.request_id] = now
            if out.finished:
                finished.append(out)
                metrics.observe_request(names[out.request_id], out.num_prompt_tokens,
                                        len(out.token_ids), first.get(out.request_id),
                                        now - arrival[out.request_id], out.finish_reason)
        metrics.update(engine.stats())
        if on_step is not None:
            on_step()
    return finished


COUNTERS = ("loraplex_preemptions_total", "loraplex_adapter_cache_hits_total",
            "loraplex_adapter_cache_misses_total", "loraplex_adapter_cache_evictions_total",
            "loraplex_adapter_loads_total", "loraplex_adapter_load_seconds_count",
            "loraplex_prompt_tokens_total", "loraplex_generation_tokens_total",
            "loraplex_time_per_output_token_seconds_count")


def test_gauges_match_the_engine_while_it_runs(dirs: Dirs) -> None:
    model_dir, adapter_dirs = dirs
    engine = make_engine(model_dir)
    register(engine, adapter_dirs)
    metrics = Metrics(engine.model_name)
    checked = []

    def check() -> None:
        s, pool = parse(metrics), engine.pool
        running = running_by_adapter(engine)
        assert value(s, "loraplex_num_requests_running") == len(engine.scheduler.running)
        assert value(s, "loraplex_num_requests_waiting") == len(engine.scheduler.waiting)
        assert value(s, "loraplex_pool_pages", use="kv") == pool.num_kv_pages
        assert value(s, "loraplex_pool_pages", use="adapter") == pool.num_adapter_pages
        assert value(s, "loraplex_pool_pages", use="free") == pool.num_free_pages
        assert value(s, "loraplex_pool_capacity_pages") == pool.num_pages
        assert value(s, "loraplex_resident_adapters") == engine.residency.num_resident
        assert value(s, "loraplex_host_cache_bytes") == engine.host_cache.num_bytes
        assert value(s, "loraplex_registered_adapters") == NUM_ADAPTERS
        shown = {dict(k)["adapter"]: v for k, v in
                 series(s, "loraplex_adapter_running_requests").items()}
        assert shown == running
        vllm = {"model_name": engine.model_name, "engine": "0"}
        assert value(s, "vllm:num_requests_running", **vllm) == len(engine.scheduler.running)
        assert value(s, "vllm:num_requests_waiting", **vllm) == len(engine.scheduler.waiting)
        usage = pool.num_kv_pages / pool.num_pages
        assert value(s, "vllm:gpu_cache_usage_perc", **vllm) == pytest.approx(usage)
        assert value(s, "vllm:kv_cache_usage_perc", **vllm) == pytest.approx(usage)
        [(labels, stamp)] = series(s, "vllm:lora_requests_info").items()
        assert dict(labels) == {
            "running_lora_adapters": ",".join(sorted(running)),
            "waiting_lora_adapters": ",".join(sorted(
                {q.request.adapter.name for q in engine.scheduler.waiting if q.request.adapter})),
            "max_lora": str(engine.residency.num_slots)}
        assert abs(stamp - time.time()) < 60
        checked.append((len(engine.scheduler.running), pool.num_kv_pages))

    # Unequal popularity: a0 ×3, a1 ×2, the rest ×1, two on the base model.
    adapters = ["a0", "a0", "a0", "a1", "a1", "a2", "a3", "a4", None, None]
    drive(engine, metrics, adapters, 12, on_step=check)
    assert max(r for r, _ in checked) == len(adapters)  # the check saw the batch full ...
    assert max(kv for _, kv in checked) > 0  # ... and K/V in use
    final = parse(metrics)
    assert series(final, "loraplex_adapter_running_requests") == {}  # no stale adapter labels
    [labels] = series(final, "vllm:lora_requests_info")
    assert dict(labels)["running_lora_adapters"] == ""
    assert value(final, "loraplex_pool_pages", use="kv") == 0
    assert_pool_clean(engine)


def test_adapter_labels_are_bounded_and_the_rest_are_other(dirs: Dirs) -> None:
    model_dir, adapter_dirs = dirs
    engine = make_engine(model_dir)
    register(engine, adapter_dirs)
    metrics = Metrics(engine.model_name, max_adapter_labels=2)
    seen = []

    def check() -> None:
        running = running_by_adapter(engine)
        shown = {dict(k)["adapter"]: v for k, v in
                 series(parse(metrics), "loraplex_adapter_running_requests").items()}
        assert len(shown) <= 3
        assert sum(shown.values()) == sum(running.values())
        for name, n in shown.items():
            if name != OTHER:
                assert running[name] == n
                assert all(m <= n for a, m in running.items() if a not in shown)
        seen.append(shown)

    drive(engine, metrics, ["a0"] * 3 + ["a1"] * 2 + ["a2", "a3", "a4"], 8, on_step=check)
    assert {"a0": 3, "a1": 2, OTHER: 3} in seen
    assert seen[-1] == {}
    finished = series(parse(metrics), "loraplex_adapter_requests_total")
    assert {dict(k)["adapter"]: v for k, v in finished.items()} == {"a0": 3, "a1": 2, OTHER: 3}


def test_counters_are_monotonic_and_equal_the_engine_counts(dirs: Dirs) -> None:
    model_dir, adapter_dirs = dirs
    engine = tight_engine(model_dir)
    register(engine, adapter_dirs)
    metrics = Metrics(engine.model_name)
    history: list[Samples] = []
    adapters = [None if i % 6 == 0 else f"a{i % NUM_ADAPTERS}" for i in range(12)]
    outs = drive(engine, metrics, adapters, 60, on_step=lambda: history.append(parse(metrics)))
    for before, after in zip(history, history[1:], strict=False):
        for name in COUNTERS:
            for labels, v in series(before, name).items():
                assert series(after, name)[labels] >= v, (name, labels)
    s = history[-1]
    res, hc = engine.residency, engine.host_cache
    assert engine.scheduler.num_preemptions > 0 and res.num_evictions > 0  # the workload bites
    assert value(s, "loraplex_preemptions_total") == engine.scheduler.num_preemptions
    assert value(s, "loraplex_adapter_cache_hits_total", tier="host") == hc.num_hits
    assert value(s, "loraplex_adapter_cache_misses_total", tier="host") == hc.num_misses
    assert value(s, "loraplex_adapter_cache_evictions_total", tier="host") == hc.num_evictions
    assert value(s, "loraplex_adapter_cache_misses_total", tier="device") == res.num_loads
    assert value(s, "loraplex_adapter_cache_evictions_total", tier="device") == res.num_evictions
    disk = value(s, "loraplex_adapter_loads_total", source="disk")
    host = value(s, "loraplex_adapter_loads_total", source="host")
    assert disk > 0 and host > 0 and disk + host == res.num_loads
    assert disk == hc.num_misses  # a load from disk is exactly a host-tier miss
    assert value(s, "loraplex_adapter_load_seconds_count", source="disk") == disk
    assert value(s, "loraplex_adapter_load_seconds_sum", source="disk") > 0
    # Request-level observations against the outputs themselves.
    assert len(outs) == len(adapters)
    num_tokens = sum(len(o.token_ids) for o in outs)
    assert value(s, "loraplex_prompt_tokens_total") == len(PROMPT) * len(adapters)
    assert value(s, "loraplex_generation_tokens_total") == num_tokens == 60 * len(adapters)
    assert value(s, "loraplex_requests_finished_total", finish_reason="length") == len(adapters)
    assert value(s, "loraplex_time_to_first_token_seconds_count") == len(adapters)
    assert value(s, "loraplex_time_per_output_token_seconds_count") == num_tokens - len(adapters)
    assert value(s, "loraplex_e2e_request_latency_seconds_count") == len(adapters)
    assert value(s, "loraplex_adapter_requests_total", adapter=engine.model_name) == 2
    assert_pool_clean(engine)


def test_a_new_engine_does_not_make_counters_go_back(dirs: Dirs) -> None:
    model_dir, adapter_dirs = dirs
    metrics = Metrics("m")
    totals, load_totals = [], []
    for _ in range(2):  # a restarted engine counts from zero again (adapter loads from 1)
        engine = tight_engine(model_dir)
        register(engine, adapter_dirs)
        drive(engine, metrics, [f"a{i}" for i in range(NUM_ADAPTERS)], 4)
        s = parse(metrics)
        totals.append(value(s, "loraplex_adapter_cache_misses_total", tier="device"))
        loads = value(s, "loraplex_adapter_loads_total", source="disk") + value(
            s, "loraplex_adapter_loads_total", source="host")
        metrics.update(engine.stats())  # a repeated snapshot adds nothing
        again = parse(metrics)
        assert value(again, "loraplex_adapter_cache_misses_total", tier="device") == totals[-1]
        assert value(again, "loraplex_adapter_loads_total", source="disk") + value(
            again, "loraplex_adapter_loads_total", source="host") == loads
        load_totals.append(loads)
    assert totals[1] == 2 * totals[0] > 0
    assert load_totals[1] == 2 * load_totals[0] > 0


def test_http_aborts_and_isolation() -> None:
    one, two = Metrics("m"), Metrics("m")  # own registries: no duplicate-name error
    for status in (200, 200, 404):
        one.observe_http("/v1/completions", "post", status)
    one.count_abort("deadline")
    s = parse(one)
    labels = {"route": "/v1/completions", "method": "POST"}
    assert value(s, "loraplex_http_requests_total", status="200", **labels) == 2
    assert value(s, "loraplex_http_requests_total", status="404", **labels) == 1
    assert value(s, "loraplex_early_aborts_total", reason="deadline") == 1
    assert value(parse(two), "loraplex_early_aborts_total", reason="deadline") == 0
    assert series(parse(two), "loraplex_http_requests_total") == {}
    assert REGISTRY.get_sample_value("loraplex_early_aborts_total", {"reason": "deadline"}) is None
    with pytest.raises(ValueError, match="max_adapter_labels"):
        Metrics("m", max_adapter_labels=0)


def test_module_imports_no_http_model_or_kernels() -> None:
    code = ("import sys, loraplex.server.metrics; bad = [m for m in sys.modules if m.startswith("
            "('fastapi', 'torch', 'loraplex.model', 'loraplex.kernels'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- the Grafana dashboard ---------------------------------------------------------------
_NAME = re.compile(r"\b(?:loraplex_\w+|vllm:[\w:]+)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"")
SCRAPE_LABELS = {"le", "instance", "job"}


def dashboard_exprs() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    assert board["schemaVersion"] >= 36
    assert any(i.get("name") == "DS_PROMETHEUS" for i in board["__inputs"])
    return [(panel["title"], t["expr"]) for panel in board["panels"]
            for t in panel.get("targets", [])]


def test_dashboard_queries_only_exported_series(dirs: Dirs) -> None:
    model_dir, adapter_dirs = dirs
    engine = tight_engine(model_dir)
    register(engine, adapter_dirs)
    metrics = Metrics(engine.model_name)
    metrics.observe_http("/v1/completions", "POST", 200)
    labels_of: dict[str, set[str]] = {}

    def collect() -> None:  # over the whole run: some series exist only while requests run
        for name, labels in parse(metrics):
            labels_of.setdefault(name, set()).update(k for k, _ in labels)

    drive(engine, metrics, ["a0", "a1", "a2", "a3", None], 30, on_step=collect)
    exprs = dashboard_exprs()
    assert len(exprs) >= 12
    used = set()
    for title, expr in exprs:
        names = set(_NAME.findall(expr))
        assert names, f"{title}: {expr} queries none of our series"
        unknown = names - labels_of.keys()
        assert not unknown, f"{title}: {sorted(unknown)} not exported"
        known = set().union(*(labels_of[n] for n in names)) | SCRAPE_LABELS
        for group in _GROUPING.findall(expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in known, f"{title}: grouping by unknown label {label}"
        for label in _MATCHER.findall(expr):
            assert label in known, f"{title}: matcher on unknown label {label}"
        used |= names
    # Every metric family of item 5 has a panel.
    for stem in ("http_requests_total", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_bucket", "time_per_output_token_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "num_requests_running",
                 "num_requests_waiting", "pool_pages", "adapter_loads_total",
                 "adapter_load_seconds_bucket", "adapter_cache_hits_total",
                 "adapter_cache_misses_total", "adapter_cache_evictions_total",
                 "adapter_running_requests", "preemptions_total", "requests_finished_total"):
        assert f"loraplex_{stem}" in used, stem
