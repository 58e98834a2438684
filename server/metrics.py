"""Prometheus metrics of one server (own registry): HTTP, request latency, engine snapshots, vllm:*.

Imports only prometheus_client and `loraplex.scheduler.stats`; never FastAPI, model or kernels.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from loraplex.scheduler.stats import EngineStats

OTHER = "other"
"""Label value that sums the adapters beyond `max_adapter_labels`."""

# Latency buckets span a cached decode step (ms) to a long generation under load (minutes).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                1.0, 1.5, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 6.0, 10.0, 15.0, 20.0, 30.0,
               45.0, 60.0, 120.0, 300.0, 600.0, 1200.0)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0)

# Cumulative EngineStats field → (counter attribute, its label values); exported by deltas.
_CUMULATIVE = {
    "num_preemptions": ("preemptions", ()),
    "host_cache_hits": ("cache_hits", ("host",)),
    "host_cache_misses": ("cache_misses", ("host",)),
    "host_cache_evictions": ("cache_evictions", ("host",)),
    "device_adapter_loads": ("cache_misses", ("device",)),
    "device_adapter_evictions": ("cache_evictions", ("device",)),
    "num_early_aborts": ("early_aborts", ("deadline",)),
    "host_prefetches": ("host_prefetches", ()),
    "host_blocking_reads": ("host_blocking_reads", ()),
    "device_prefetches": ("device_prefetches", ()),
    "device_prefetches_unused": ("device_prefetches_unused", ()),
    "resident_adapter_admissions": ("cache_hits", ("device",)),
}


class Metrics:
    """Every metric of one server; `update` is fed engine snapshots, `observe_*` by the routes."""

    def __init__(self, model_name: str, max_adapter_labels: int = 64) -> None:
        if max_adapter_labels < 1:
            raise ValueError(f"max_adapter_labels: must be >= 1, got {max_adapter_labels}")
        self.model_name = model_name
        self.max_adapter_labels = max_adapter_labels
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._last_load_number = 0  # of the adapter loads folded in (see `update`)
        self._last: dict[str, int] = {}
        self._adapter_labels: set[str] = set()
        self._request_adapters: set[str] = set()
        self._lora_info_labels: tuple[str, str, str] | None = None
        self._init_http_and_requests()
        self._init_engine()
        self._init_vllm()

    # ---- construction --------------------------------------------------------------------
    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...],
                   labels: tuple[str, ...] = ()) -> Histogram:
        return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

    def _init_http_and_requests(self) -> None:
        self.http_requests = self._counter(
            "loraplex_http_requests", "HTTP requests by route template, method and status.",
            ("route", "method", "status"))
        self.prompt_tokens = self._counter("loraplex_prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = self._counter(
            "loraplex_generation_tokens", "Tokens generated.")
        self.requests_finished = self._counter(
            "loraplex_requests_finished", "Finished requests by finish reason.",
            ("finish_reason",))
        self.adapter_requests = self._counter(
            "loraplex_adapter_requests",
            f"Finished requests by adapter (base: the model name; beyond the first "
            f"max_adapter_labels adapters: {OTHER!r}).", ("adapter",))
        self.ttft = self._histogram("loraplex_time_to_first_token_seconds",
                                    "Time from arrival to the first generated token.",
                                    TTFT_BUCKETS)
        self.tpot = self._histogram("loraplex_time_per_output_token_seconds",
                                    "Time between consecutive output tokens of a request.",
                                    TPOT_BUCKETS)
        self.e2e = self._histogram("loraplex_e2e_request_latency_seconds",
                                   "Time from arrival to the last token.", E2E_BUCKETS)
        self.early_aborts = self._counter(
            "loraplex_early_aborts", "Requests aborted early by the server, by reason.",
            ("reason",))
        self.early_aborts.labels("deadline")

    def _init_engine(self) -> None:
        self.num_running = self._gauge("loraplex_num_requests_running", "Running requests.")
        self.num_waiting = self._gauge("loraplex_num_requests_waiting", "Waiting requests.")
        self.pool_pages = self._gauge("loraplex_pool_pages", "Pool pages by use.", ("use",))
        self.pool_capacity = self._gauge("loraplex_pool_capacity_pages", "Pages in the pool.")
        self.host_prefetches = self._counter(
            "loraplex_host_prefetches", "Adapters read from disk ahead of admission by a worker.")
        self.host_blocking_reads = self._counter(
            "loraplex_host_blocking_reads", "Adapter disk reads the engine thread waited for.")
        self.device_prefetches = self._counter(
            "loraplex_device_prefetches",
            "Adapters copied into the pool ahead of admission for waiting requests.")
        self.device_prefetches_unused = self._counter(
            "loraplex_device_prefetches_unused",
            "Prefetched adapters evicted before any request used them.")
        self.host_cache_capacity = self._gauge(
            "loraplex_host_cache_capacity_bytes", "Bound of the host-RAM adapter tier.")
        self.host_cached_adapters = self._gauge(
            "loraplex_host_cached_adapters", "Parsed adapters held in host RAM.")
        self.host_cache_bytes = self._gauge(
            "loraplex_host_cache_bytes", "Bytes of parsed adapters held in host RAM.")
        self.resident_adapters = self._gauge(
            "loraplex_resident_adapters", "Adapters resident in the device pool.")
        self.max_resident_adapters = self._gauge(
            "loraplex_max_resident_adapters", "Adapter slots on the device.")
        self.registered_adapters = self._gauge(
            "loraplex_registered_adapters", "Adapters registered (any tier).")
        self.adapter_running = self._gauge(
            "loraplex_adapter_running_requests",
            f"Running requests per adapter (top max_adapter_labels; the rest as {OTHER!r}).",
            ("adapter",))
        self.preemptions = self._counter("loraplex_preemptions", "Sequences preempted.")
        self.cache_hits = self._counter(
            "loraplex_adapter_cache_hits", "Adapter found in a tier's cache.", ("tier",))
        self.cache_misses = self._counter(
            "loraplex_adapter_cache_misses",
            "Adapter absent from a tier (device: a load into the pool).", ("tier",))
        self.cache_evictions = self._counter(
            "loraplex_adapter_cache_evictions", "Adapters evicted from a tier.", ("tier",))
        self.adapter_loads = self._counter(
            "loraplex_adapter_loads", "Adapter loads into the pool by source tier.", ("source",))
        self.adapter_load_seconds = self._histogram(
            "loraplex_adapter_load_seconds", "Time to fetch an adapter for the pool, by source.",
            LOAD_BUCKETS, ("source",))
        for source in ("disk", "host"):
            self.adapter_loads.labels(source)
            self.adapter_load_seconds.labels(source)
        self.cache_hits.labels("host")
        for tier in ("host", "device"):
            self.cache_misses.labels(tier)
            self.cache_evictions.labels(tier)

    def _init_vllm(self) -> None:
        # Names, labels and meaning as vLLM V1 (vllm/v1/metrics/loggers.py): gauges labelled
        # model_name + engine; lora_requests_info unlabelled by model, its value a timestamp.
        labels = ("model_name", "engine")
        ours = (self.model_name, "0")
        self.vllm_running = self._gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.",
            labels).labels(*ours)
        self.vllm_waiting = self._gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
            labels).labels(*ours)
        # vLLM renamed gpu_cache_usage_perc to kv_cache_usage_perc; the Gateway API inference
        # extension now reads the new name, older dashboards the old one: export both.
        self.vllm_gpu_cache = self._gauge(
            "vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.",
            labels).labels(*ours)
        self.vllm_kv_cache = self._gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
            labels).labels(*ours)
        self.vllm_lora_info = self._gauge(
            "vllm:lora_requests_info", "Running stats on lora requests.",
            ("running_lora_adapters", "max_lora", "waiting_lora_adapters"))

    # ---- observations from the routes ----------------------------------------------------
    def observe_http(self, route: str, method: str, status: int) -> None:
        """One answered HTTP request; `route` is the route template, never the raw path."""
        self.http_requests.labels(route, method.upper(), str(status)).inc()

    def observe_request(self, adapter: str | None, num_prompt_tokens: int,
                        num_generated_tokens: int, ttft_s: float | None, e2e_s: float,
                        finish_reason: str) -> None:
        """One finished request (`ttft_s` None when no token came out)."""
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_generated_tokens)
        self.requests_finished.labels(finish_reason).inc()
        self.adapter_requests.labels(self._request_label(adapter)).inc()
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        self.e2e.observe(e2e_s)

    def _request_label(self, adapter: str | None) -> str:
        # A counter's series must never vanish, so the first adapters seen keep their label.
        name = adapter or self.model_name
        with self._lock:
            if name in self._request_adapters:
                return name
            if len(self._request_adapters) < self.max_adapter_labels:
                self._request_adapters.add(name)
                return name
        return OTHER

    def observe_tpot(self, seconds: float) -> None:
        """Time since the request's previous output token (every token after the first)."""
        self.tpot.observe(seconds)

    def count_abort(self, reason: str) -> None:
        """A request the server ended early (e.g. `deadline`: it could not finish in time)."""
        self.early_aborts.labels(reason).inc()

    # ---- engine snapshots ----------------------------------------------------------------
    def update(self, stats: EngineStats) -> None:
        """Fold one `Engine.stats()` snapshot in (called after engine steps; cheap)."""
        with self._lock:
            self._update_gauges(stats)
            self._update_counters(stats)
            self._update_adapter_running(stats.running_per_adapter)
            self._update_lora_info(stats)
            if stats.num_adapter_loads < self._last_load_number:  # a new engine: from 1 again
                self._last_load_number = 0
            loads = stats.adapter_loads  # numbered consecutively, oldest first
            num_new = min(len(loads), stats.num_adapter_loads - self._last_load_number)
            new_loads = loads[len(loads) - num_new:] if num_new > 0 else ()
            self._last_load_number = max(self._last_load_number, stats.num_adapter_loads)
        for load in new_loads:  # each once, however many snapshots show it
            self.adapter_loads.labels(load.source).inc()
            self.adapter_load_seconds.labels(load.source).observe(load.seconds)

    def _update_gauges(self, stats: EngineStats) -> None:
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.pool_pages.labels("kv").set(stats.num_kv_pages)
        self.pool_pages.labels("adapter").set(stats.num_adapter_pages)
        self.pool_pages.labels("free").set(stats.num_free_pages)
        self.pool_capacity.set(stats.num_pages)
        self.host_cache_bytes.set(stats.host_cache_bytes)
        self.host_cache_capacity.set(stats.host_cache_capacity_bytes)
        self.host_cached_adapters.set(stats.num_host_cached_adapters)
        self.resident_adapters.set(stats.num_resident_adapters)
        self.max_resident_adapters.set(stats.max_resident_adapters)
        self.registered_adapters.set(stats.num_registered_adapters)
        self.vllm_running.set(stats.num_running)
        self.vllm_waiting.set(stats.num_waiting)
        self.vllm_gpu_cache.set(stats.kv_usage)
        self.vllm_kv_cache.set(stats.kv_usage)

    def _update_counters(self, stats: EngineStats) -> None:
        for field, (attr, labels) in _CUMULATIVE.items():
            value = getattr(stats, field)
            last = self._last.get(field, 0)
            # A smaller value means a new engine started from zero: count it all (a reset).
            delta = value - last if value >= last else value
            self._last[field] = value
            if delta > 0:
                counter = getattr(self, attr)
                (counter.labels(*labels) if labels else counter).inc(delta)

    def _update_adapter_running(self, running: dict[str, int]) -> None:
        if len(running) <= self.max_adapter_labels:
            shown = running
        else:
            top = sorted(running.items(), key=lambda kv: (-kv[1], kv[0]))
            shown = dict(top[: self.max_adapter_labels])
            shown[OTHER] = sum(n for _, n in top[self.max_adapter_labels:])
        for name in self._adapter_labels - shown.keys():
            self.adapter_running.remove(name)
        for name, n in shown.items():
            self.adapter_running.labels(name).set(n)
        self._adapter_labels = set(shown)

    def _update_lora_info(self, stats: EngineStats) -> None:
        # vLLM adds a series per label combination and sets it to the current time; the gateway
        # reads the newest. We keep only the newest, so the series count stays at one.
        labels = (",".join(sorted(stats.running_per_adapter)), str(stats.max_resident_adapters),
                  ",".join(stats.waiting_adapters))
        if labels != self._lora_info_labels:
            if self._lora_info_labels is not None:
                self.vllm_lora_info.remove(*self._lora_info_labels)
            self._lora_info_labels = labels
        self.vllm_lora_info.labels(*labels).set(time.time())

    # ---- exposition ----------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The `/metrics` body in Prometheus text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
