"""`/metrics` over HTTP parses with prometheus-client's parser and moves as the traffic says;
a client that disconnects mid-stream frees its sequence at once."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import MODEL_NAME


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, lab), v in samples.items()
               if n == name and set(labels.items()) <= set(lab))


def wait_for(url: str, name: str, target: float, timeout_s: float = 10.0, **labels: str) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(url)
        if value(samples, name, **labels) == target or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_counters_and_gauges_follow_the_traffic(server, offline):
    url = server.url
    before = scrape(url)
    prompts = ["one two three", "four five", "six"]
    for p in prompts:
        r = httpx.post(f"{url}/v1/completions", json={
            "model": "rslora16", "prompt": p, "max_tokens": 5, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200
    assert httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"}
                      ).status_code == 404
    after = wait_for(url, "vllm:num_requests_running", 0)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = "/v1/completions"
    assert delta("loraplex_http_requests_total", route=route, status="200") == 3
    assert delta("loraplex_http_requests_total", route=route, status="404") == 1
    assert delta("loraplex_generation_tokens_total") == 15
    assert delta("loraplex_prompt_tokens_total") == sum(
        len(offline.tokenizer.encode(p)) for p in prompts)
    assert delta("loraplex_requests_finished_total", finish_reason="length") == 3
    assert delta("loraplex_e2e_request_latency_seconds_count") == 3
    assert delta("loraplex_time_to_first_token_seconds_count") == 3
    assert delta("loraplex_time_per_output_token_seconds_count") == 3 * 4
    assert value(after, "loraplex_pool_pages", use="kv") == 0
    assert value(after, "loraplex_pool_pages", use="adapter") > 0
    assert value(after, "loraplex_adapter_loads_total") >= 1
    total = sum(value(after, "loraplex_pool_pages", use=u) for u in ("kv", "adapter", "free"))
    assert total == value(after, "loraplex_pool_capacity_pages") == server.engine.pool.num_pages
    assert value(after, "vllm:num_requests_waiting") == 0


def test_running_gauges_and_disconnect_frees_the_sequence(server):
    url = server.url
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
            "model": "lora8", "prompt": "keep going", "max_tokens": 900, "ignore_eos": True,
            "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        during = wait_for(url, "vllm:num_requests_running", 1)
        assert value(during, "vllm:num_requests_running") == 1
        info = [lab for (n, lab), _ in during.items() if n == "vllm:lora_requests_info"]
        assert any(dict(lab)["running_lora_adapters"] == "lora8" for lab in info)
        assert value(during, "loraplex_pool_pages", use="kv") > 0
        assert 0 < value(during, "vllm:gpu_cache_usage_perc") <= 1
    # the client hung up long before 900 tokens: its sequence and pages go at once
    after = wait_for(url, "vllm:num_requests_running", 0)
    assert value(after, "vllm:num_requests_running") == 0
    assert value(after, "loraplex_pool_pages", use="kv") == 0
    assert not server.engine.has_unfinished()
    ok = httpx.post(f"{url}/v1/completions", json={"model": MODEL_NAME, "prompt": "after",
                                                   "max_tokens": 2})
    assert ok.status_code == 200


def test_a_request_that_cannot_meet_its_deadline_is_aborted_early(server):
    url = server.url
    before = scrape(url)
    late = httpx.post(f"{url}/v1/completions", json={
        "model": MODEL_NAME, "prompt": "too late", "max_tokens": 4, "ttft_deadline_s": 1e-6})
    assert late.status_code == 503, late.text
    assert late.json()["error"]["type"] == "service_unavailable_error"
    ok = httpx.post(f"{url}/v1/completions", json={
        "model": MODEL_NAME, "prompt": "in time", "max_tokens": 4, "ttft_deadline_s": 600})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    after = wait_for(url, "vllm:num_requests_running", 0)
    aborts = value(after, "loraplex_early_aborts_total", reason="deadline") - value(
        before, "loraplex_early_aborts_total", reason="deadline")
    assert aborts == 1
