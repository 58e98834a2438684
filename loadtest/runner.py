"""Bounded async HTTP load runner: replays a trace against any OpenAI-compatible server over
streaming `/v1/completions`, timing each request (TTFT, token gaps, end to end).

Speaks only HTTP (httpx); knows nothing of the engine, so it drives vLLM or LoRAX alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass

import httpx
from loraplex.loadtest.results import RequestResult
from loraplex.loadtest.trace import TraceRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    """Where to send a trace and how."""

    base_url: str
    """The server's root, e.g. `http://127.0.0.1:8000` (a trailing `/v1` is accepted)."""
    base_model: str | None = None
    """`model` for requests without an adapter (the served base model's name)."""
    max_concurrency: int = 256
    """Requests in flight at most; later arrivals wait (their latency counts from arrival)."""
    timeout_s: float = 600.0
    """Per request, connect to last byte."""
    max_wall_s: float | None = None
    """Stop the whole run after this long: requests still open are cancelled and recorded as
    errors (`unfinished`), so an overloaded baseline cannot run for ever."""
    api_keys: tuple[tuple[str | None, str], ...] = ()
    """(tenant, key) pairs; a request's tenant picks its bearer key."""
    default_api_key: str | None = None
    """The key of a tenant with none of its own (None: no Authorization header)."""
    temperature: float = 0.0
    ignore_eos: bool = True
    """Send vLLM's `ignore_eos` extension so that every request yields `max_tokens` tokens."""
    include_usage: bool = True
    """Ask for the usage chunk (`stream_options`) to count tokens exactly."""
    progress: bool = True
    """A progress bar on stderr while it runs."""

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency: must be >= 1, got {self.max_concurrency}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s}")

    @property
    def root(self) -> str:
        url = self.base_url.rstrip("/")
        return url.removesuffix("/v1")


class _Progress:
    """tqdm if importable, else a plain stderr line."""

    def __init__(self, total: int, enabled: bool, label: str):
        self.total, self.done, self.errors, self.enabled, self.label = total, 0, 0, enabled, label
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc=label, unit="req", file=sys.stderr,
                                dynamic_ncols=True)

    def update(self, ok: bool) -> None:
        self.done += 1
        self.errors += not ok
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if self.errors:
                self.bar.set_postfix(errors=self.errors)
        elif self.done == self.total or self.done % max(1, self.total // 50) == 0:
            sys.stderr.write(f"\r{self.label}: {self.done}/{self.total} "
                             f"({self.errors} errors)")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


def _body(req: TraceRequest, config: RunnerConfig) -> dict:
    body = {"model": req.adapter or config.base_model, "prompt": req.prompt,
            "max_tokens": req.max_tokens, "temperature": config.temperature, "stream": True}
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


def _headers(req: TraceRequest, config: RunnerConfig) -> dict[str, str]:
    key = dict(config.api_keys).get(req.tenant, config.default_api_key)
    return {"Authorization": f"Bearer {key}"} if key else {}


def _error_message(payload: object) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return str(payload["error"].get("message", payload["error"]))
    return str(payload)[:500]


async def _stream(client: httpx.AsyncClient, req: TraceRequest, config: RunnerConfig,
                  res: RequestResult, t0: float) -> None:
    """Send one request and fold its SSE stream into `res`."""
    num_chunks, usage_tokens = 0, None
    async with client.stream("POST", config.root + "/v1/completions", json=_body(req, config),
                             headers=_headers(req, config)) as resp:
        res.status = resp.status_code
        if resp.status_code != 200:
            raw = await resp.aread()
            try:
                res.error = _error_message(json.loads(raw))
            except ValueError:
                res.error = raw.decode(errors="replace")[:500]
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter() - t0
            payload = json.loads(data)
            if "error" in payload:
                res.error = _error_message(payload)
                return
            if payload.get("usage"):
                usage_tokens = payload["usage"].get("completion_tokens")
                res.num_prompt_tokens = payload["usage"].get("prompt_tokens")
            for choice in payload.get("choices") or ():
                if choice.get("text"):
                    if res.first_token_s is None:
                        res.first_token_s = now
                    res.chunk_times_s.append(now)
                    res.text += choice["text"]
                    num_chunks += 1
                if choice.get("finish_reason"):
                    res.finish_reason = choice["finish_reason"]
    res.end_s = time.perf_counter() - t0
    # Servers that stream one token per chunk but send no usage: count the chunks.
    res.num_output_tokens = usage_tokens if usage_tokens is not None else num_chunks


async def _one(client: httpx.AsyncClient, sem: asyncio.Semaphore, req: TraceRequest,
               config: RunnerConfig, t0: float, progress: _Progress) -> RequestResult:
    res = RequestResult(index=req.index, adapter=req.adapter, tenant=req.tenant,
                        arrival_s=req.arrival_s)
    try:
        async with sem:
            res.sent_s = time.perf_counter() - t0
            await _stream(client, req, config, res, t0)
    except asyncio.CancelledError:
        res.error = "unfinished: the run's max_wall_s ran out"
    except (httpx.HTTPError, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    if res.error is not None:
        res.end_s = None
        logger.debug("request %d failed: %s", req.index, res.error)
    progress.update(res.is_ok)
    return res


async def run_trace_async(requests: list[TraceRequest], config: RunnerConfig,
                          label: str = "requests") -> list[RequestResult]:
    """Replay `requests` on their arrival schedule; one result per request, in trace order."""
    sem = asyncio.Semaphore(config.max_concurrency)
    limits = httpx.Limits(max_connections=config.max_concurrency,
                          max_keepalive_connections=config.max_concurrency)
    progress = _Progress(len(requests), config.progress, label)
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    async with httpx.AsyncClient(timeout=httpx.Timeout(config.timeout_s), limits=limits) as client:
        t0 = time.perf_counter()
        tasks: list[asyncio.Task] = []
        wall = asyncio.get_running_loop().create_task(_dispatch(
            client, sem, ordered, config, t0, progress, tasks))
        try:
            await asyncio.wait_for(asyncio.shield(wall), config.max_wall_s)
        except TimeoutError:
            logger.warning("%s: max_wall_s %.0f s ran out; cancelling what is still open",
                           label, config.max_wall_s)
            wall.cancel()
            for task in tasks:
                task.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(wall, return_exceptions=True)
    progress.close()
    results = []
    for i, req in enumerate(ordered):
        # A task cancelled before it ever ran, or an arrival the dispatcher never reached.
        res = done[i] if i < len(done) else None
        if not isinstance(res, RequestResult):
            res = RequestResult(index=req.index, adapter=req.adapter, tenant=req.tenant,
                                arrival_s=req.arrival_s, error="unfinished: never sent")
        results.append(res)
    return sorted(results, key=lambda r: r.index)


async def _dispatch(client: httpx.AsyncClient, sem: asyncio.Semaphore,
                    ordered: list[TraceRequest], config: RunnerConfig, t0: float,
                    progress: _Progress, tasks: list[asyncio.Task]) -> None:
    """Start each request at its arrival time, then wait for all of them."""
    loop = asyncio.get_running_loop()
    for req in ordered:
        delay = req.arrival_s - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(_one(client, sem, req, config, t0, progress)))
    if tasks:
        await asyncio.wait(tasks)


def run_trace(requests: list[TraceRequest], config: RunnerConfig,
              label: str = "requests") -> list[RequestResult]:
    """Blocking wrapper of `run_trace_async` (its own event loop)."""
    return asyncio.run(run_trace_async(requests, config, label))


def scrape_metric(base_url: str, names: tuple[str, ...], timeout_s: float = 10.0,
                  headers: dict[str, str] | None = None) -> float | None:
    """The sum over labels of the first of `names` that /metrics exports; None if none is
    (or the server has no /metrics)."""
    root = RunnerConfig(base_url).root
    try:
        resp = httpx.get(root + "/metrics", timeout=timeout_s, headers=headers)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    for name in names:
        values = [float(line.rsplit(" ", 1)[1]) for line in resp.text.splitlines()
                  if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " ")]
        if values:
            return sum(values)
    return None
