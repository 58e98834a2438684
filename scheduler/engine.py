"""Engine: the step loop (schedule → run → sample → update) and the offline API the server wraps.

Every call happens on the engine's thread (the server's bridge ensures it); the one other
thread is the host tier's prefetch worker, which only reads adapters into `HostCache`.
"""

from __future__ import annotations

import gc
import itertools
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.memory.adapters import AdapterResidency
from loraplex.memory.config import MemoryConfig
from loraplex.memory.host_cache import AdapterRecord, HostCache, Prefetcher
from loraplex.memory.kv import KVLayout
from loraplex.memory.pool import PagePool
from loraplex.model.adapters.canonical import AdapterWeights
from loraplex.model.adapters.peft import load_peft_adapter
from loraplex.model.config import ModelConfig, parse_dtype
from loraplex.model.models.llama import LlamaModel
from loraplex.model.runner import ModelRunner
from loraplex.model.shira_fuse import fusion_choice
from loraplex.model.sampler import Sampler, SamplingParams, make_generator
from loraplex.model.tokenizer import IncrementalDetokenizer, StopChecker, Tokenizer
from loraplex.model.weights import load_weights, resolve_model_dir
from loraplex.scheduler.batch import StepOutput
from loraplex.scheduler.config import EngineConfig, SchedulerConfig  # noqa: F401 (re-export)
from loraplex.scheduler.errors import (
    AdapterNameError,
    RequestError,
    RequestTooLongError,
    UnknownAdapterError,
)
from loraplex.scheduler.request import (
    Prefix,
    Request,
    RequestOutput,
    RequestStatus,
    Sequence,
    check_deadline,
    check_prompt_ids,
)
from loraplex.scheduler.scheduler import Scheduler
from loraplex.scheduler.stats import ADAPTER_LOAD_LOG, AdapterLoad, EngineStats, snapshot
from loraplex.scheduler.text import TextState

logger = logging.getLogger(__name__)
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass(frozen=True, slots=True)
class PreparedAdapter:
    """An adapter read and validated off the engine thread, ready for `install_adapter`."""

    record: AdapterRecord
    weights: AdapterWeights



def freeze_heap() -> None:
    """Take every object alive now (modules, model, engine, app) out of the cyclic garbage
    collector's scans, once a long-lived process of one engine has set up: its full collections
    otherwise walk everything torch and the server import, milliseconds per step at hundreds of
    sequences (BENCHMARKS.md). Later objects are collected as usual."""
    gc.collect()
    gc.freeze()


class Engine:
    """Many requests, each on its own adapter (or none), in one continuous batch."""

    def __init__(self, config: EngineConfig = EngineConfig(), *,
                 clock: Callable[[], float] = time.monotonic):
        """`clock` (seconds) times arrivals and deadlines; tests pass a virtual one."""
        self.config = config
        self.clock = clock
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model_dir = resolve_model_dir(config.model)
        self.model_config = ModelConfig.from_dir(self.model_dir)
        mc = self.model_config
        if config.dtype is not None:
            self.dtype = parse_dtype(config.dtype)
        elif self.device.type == "cpu":
            self.dtype = torch.float32
        else:
            self.dtype = parse_dtype(mc.torch_dtype or "bfloat16")
        t0 = time.perf_counter()
        self.model = LlamaModel(mc, load_weights(self.model_dir, self.dtype, self.device))
        logger.info("loaded %s (%s) in %.1f s", self.model_dir, mc.model_type,
                    time.perf_counter() - t0)
        self.tokenizer = Tokenizer(self.model_dir) if config.load_tokenizer else None
        eos = tuple(self.tokenizer.eos_token_ids) if self.tokenizer else mc.eos_token_ids
        self.max_model_len = min(config.scheduler.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        self._init_memory(config.memory)
        self.scheduler = Scheduler(config.scheduler, self.pool, self.kv_layout, self.residency,
                                   self._fetch_adapter, eos, self.max_model_len,
                                   host_cache=self.host_cache, prefetcher=self.prefetcher,
                                   device_prefetch=config.memory.device_prefetch)
        self._tenant_deadlines: dict[str, float] = {}
        self._adapter_loads: deque[AdapterLoad] = deque(maxlen=ADAPTER_LOAD_LOG)
        self._num_adapter_loads = 0
        page_size = config.memory.page_size
        self.runner = ModelRunner(self.model, self.kv_layout, cuda_graphs=config.cuda_graphs,
                                  max_batch=config.scheduler.max_num_seqs,
                                  max_pages=-(-self.max_model_len // page_size),
                                  max_tokens=config.scheduler.max_num_batched_tokens
                                  if config.cuda_graphs_prefill else 0)
        self.sampler = Sampler()
        self.adapters: dict[str, AdapterRecord] = {}
        self._seqs: dict[str, Sequence] = {}
        self._text: dict[int, TextState] = {}
        self._seq_ids = itertools.count()

    def _init_memory(self, mem: MemoryConfig) -> None:
        mc = self.model_config
        self.kv_layout = KVLayout(mc.num_layers, mem.page_size, mc.num_kv_heads, mc.head_dim)
        page_numel = self.kv_layout.page_numel
        elsize = torch.finfo(self.dtype).bits // 8
        widest = max(sum(mc.module_shape(m)) for m in ("q_proj", "gate_proj", "down_proj"))
        if widest * max(1, 4 // elsize) > page_numel:
            raise ValueError(f"page_size: {mem.page_size} makes pages of {page_numel} elements, "
                             f"too small for adapter rows of {widest}; raise page_size")
        num_pages = mem.num_pages or mem.pool_bytes // (page_numel * elsize)
        self.pool = PagePool(num_pages, page_numel, self.dtype, self.device)
        self.residency = AdapterResidency(self.pool, mc, mem.max_rank, mem.max_resident_adapters)
        self.host_cache = HostCache(mem.host_cache_bytes, self._read_adapter,
                                    pin_memory=self.device.type == "cuda")
        self.prefetcher = Prefetcher(self.host_cache) if mem.prefetch else None
        logger.info("page pool: %d pages of %d tokens (%.1f MiB)", num_pages, mem.page_size,
                    num_pages * page_numel * elsize / 2**20)

    # ---- adapters ------------------------------------------------------------------------
    def _read_adapter(self, record: AdapterRecord) -> AdapterWeights:
        weights = load_peft_adapter(record.path, self.model_config,
                                    max_rank=self.config.memory.max_rank,
                                    base_weight=self._base_weight)
        return weights.cast(self.dtype)  # the pool's dtype: half the host bytes in bf16

    def _base_weight(self, layer: int, module: str) -> torch.Tensor:
        """DoRA's norm needs the base weight as loaded, even while a SHiRA adapter is fused
        into it (a snapshot taken under the fusion's lock; this runs on the prefetch thread)."""
        if not self.config.shira_fusion:
            return self.model.base_weight(layer, module)
        with self.runner.shira.lock:
            return self.runner.shira.pristine_weight(layer, module)

    def _fetch_adapter(self, record: AdapterRecord) -> AdapterWeights:
        """The residency's loader: host cache first, disk on a miss (timed for metrics)."""
        t0 = time.perf_counter()
        weights, source = self.host_cache.get_with_source(record)
        self._num_adapter_loads += 1
        self._adapter_loads.append(AdapterLoad(record.name, source, time.perf_counter() - t0,
                                               self._num_adapter_loads))
        return weights

    def prepare_adapter(self, name: str, path: str | Path) -> PreparedAdapter:
        """Read and validate an adapter without touching the engine (safe on any thread).

        Raises an `AdapterError` naming the problem, or `AdapterNameError`.
        """
        if not _ADAPTER_NAME.match(name or "") or name == self.model_name:
            raise AdapterNameError(f"invalid adapter name {name!r}")
        record = AdapterRecord(name=name, path=str(path), kind="", max_rank=0, num_bytes=0,
                               num_pages=0, target_modules=())
        weights = self._read_adapter(record)
        record.kind, record.max_rank = weights.kind, weights.max_rank
        record.num_bytes, record.target_modules = weights.num_bytes, weights.target_modules
        record.num_pages = self.residency.num_pages_for(weights)
        record.meta = dict(weights.meta)
        if record.num_pages >= self.pool.num_pages:
            raise RequestTooLongError(f"adapter {name} needs {record.num_pages} pages; "
                                      f"the pool has {self.pool.num_pages}")
        return PreparedAdapter(record, weights)

    def install_adapter(self, prepared: PreparedAdapter) -> AdapterRecord:
        """Register (or hot-swap) a prepared adapter: later requests get this version."""
        record, weights = prepared.record, prepared.weights
        old = self.adapters.get(record.name)
        if old is not None:
            record.version = old.version + 1
            self._forget(old)
        self.host_cache.put_if_room(record, weights)  # never evicts hot ones for a new one
        self.adapters[record.name] = record
        logger.info("adapter %s v%d registered: %s rank %d, %d pages", record.name,
                    record.version, record.kind, record.max_rank, record.num_pages)
        return record

    def add_adapter(self, name: str, path: str | Path) -> AdapterRecord:
        """Validate and register (or hot-swap) an adapter; raises AdapterError, changing nothing."""
        return self.install_adapter(self.prepare_adapter(name, path))

    def adapter_location(self, name: str) -> tuple[str, int]:
        """(where the current version is: `device`, `host` or `disk`; requests running on it)."""
        record = self.adapters.get(name)
        if record is None:
            raise UnknownAdapterError(f"adapter {name!r} not found")
        where = ("device" if self.residency.is_resident(record)
                 else "host" if record in self.host_cache else "disk")
        running = sum(1 for s in self._seqs.values()
                      if s.request.adapter is not None and s.request.adapter.name == name
                      and s.status is RequestStatus.RUNNING)
        return where, running

    def paths_in_use(self) -> set[str]:
        """Adapter folders that a registered version or an unfinished request still needs."""
        paths = {r.path for r in self.adapters.values()}
        paths.update(s.request.adapter.path for s in self._seqs.values()
                     if s.request.adapter is not None)
        return paths

    def remove_adapter(self, name: str) -> None:
        """Running requests finish on it; later ones get UnknownAdapterError."""
        record = self.adapters.pop(name, None)
        if record is None:
            raise UnknownAdapterError(f"adapter {name!r} not found")
        self._forget(record)

    def _forget(self, record: AdapterRecord) -> None:
        self.residency.drop(record)
        self.host_cache.drop(record)

    def close(self) -> None:
        """Stop the prefetch worker (it also ends by itself when idle)."""
        if self.prefetcher is not None:
            self.prefetcher.close()

    @property
    def model_name(self) -> str:
        return self.model_dir.name

    # ---- requests ------------------------------------------------------------------------
    def set_tenant_weight(self, tenant: str, weight: float) -> None:
        """`tenant`'s share of tokens and batch slots relative to others (default 1.0)."""
        self.scheduler.tenants.set_weight(tenant, weight)

    def set_tenant_deadline(self, tenant: str, deadline_s: float | None) -> None:
        """Default first-token deadline (seconds after arrival) of `tenant`'s requests."""
        if deadline_s is None:
            self._tenant_deadlines.pop(tenant, None)
            return
        self._tenant_deadlines[tenant] = check_deadline(deadline_s)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    adapter: str | None = None, request_id: str | None = None,
                    tenant: str = "", deadline_s: float | None = None) -> str:
        """Queue a request; `deadline_s`: its first token is due that many seconds after
        arrival (None: the tenant's default, if any), else it is aborted while still waiting."""
        params = params or SamplingParams()
        if deadline_s is None:
            deadline_s = self._tenant_deadlines.get(tenant)
        else:
            deadline_s = check_deadline(deadline_s)
        request_id = request_id or f"req-{next(self._seq_ids)}"
        if request_id in self._seqs:
            raise RequestError(f"request id {request_id!r} is already in use")
        prompt_ids = self._prompt_ids(prompt)
        record = None
        if adapter is not None and adapter != self.model_name:
            record = self.adapters.get(adapter)
            if record is None:
                raise UnknownAdapterError(f"adapter {adapter!r} not found")
        self._check_fits(len(prompt_ids), params, record)
        now = self.clock()
        request = Request(request_id, tuple(prompt_ids), params, record, tenant, arrival_s=now,
                          deadline=None if deadline_s is None else now + deadline_s)
        seq = Sequence(next(self._seq_ids), request, make_generator(params.seed, self.device))
        self._seqs[request_id] = seq
        if self.tokenizer is not None:
            self._text[seq.seq_id] = TextState(
                IncrementalDetokenizer(self.tokenizer, prompt_ids),
                StopChecker(list(params.stop)) if params.stop else None)
        self.scheduler.add(seq)
        return request_id

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this engine has no tokenizer: send token ids")
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = list(prompt)
        return check_prompt_ids(prompt_ids, self.model_config.vocab_size)

    def _check_fits(self, num_prompt: int, params: SamplingParams,
                    record: AdapterRecord | None) -> None:
        total = num_prompt + params.max_tokens
        if total > self.max_model_len:
            raise RequestTooLongError(
                f"prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds the maximum context length {self.max_model_len}")
        pages = self.kv_layout.num_pages_for(total) + (record.num_pages if record else 0)
        if pages > self.pool.num_pages:
            raise RequestTooLongError(
                f"request needs {pages} pages of KV and adapter; the pool has "
                f"{self.pool.num_pages}: lower max_tokens or the prompt")

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self._seqs.get(request_id)
        if seq is None or seq.status.is_finished:
            return None
        self.scheduler.finish(seq, RequestStatus.ABORTED, "abort")
        return self._output(seq, [], "")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        """A snapshot for metrics (reading it changes nothing; recent adapter loads numbered)."""
        return snapshot(self.scheduler, self.pool, self.host_cache, self.residency,
                        len(self.adapters), tuple(self._adapter_loads))

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns an output for every request that moved."""
        expired = self.scheduler.expire_deadlines(self.clock())
        batch = self.scheduler.schedule()
        outputs = [self._output(s, [], "") for s in expired + self.scheduler.failed]
        self.scheduler.failed.clear()
        if batch is None:
            return outputs
        by_id = {s.seq_id: s for s in self.scheduler.running}
        if self.config.shira_fusion and batch.shira_token_slots is not None:
            record = by_id[batch.seq_ids[0]].request.adapter
            batch.shira_fused = fusion_choice(batch, record, self.runner.shira.active)
        logits = self.runner.run(batch)
        seqs = [by_id[i] for i in batch.sample_seq_ids]
        sample = self.sampler.sample(logits, [s.request.params for s in seqs],
                                     [s.generator for s in seqs])
        step = StepOutput(
            token_ids=sample.token_ids.tolist(),
            logprobs=None if sample.logprobs is None else sample.logprobs.tolist(),
            top_logprobs=None if sample.top_ids is None else [
                list(zip(ids, lps)) for ids, lps in
                zip(sample.top_ids.tolist(), sample.top_logprobs.tolist())],
        )
        for seq in self.scheduler.update(batch, step):
            outputs.append(self._advance_text(seq))
        return outputs

    def _advance_text(self, seq: Sequence) -> RequestOutput:
        state = self._text.get(seq.seq_id)
        new_ids = seq.output_ids[-1:]
        if state is None:
            return self._output(seq, new_ids, "")
        new_text, text, stopped = state.push(seq.output_ids[-1], seq.status.is_finished)
        if stopped and not seq.status.is_finished:
            self.scheduler.finish(seq, RequestStatus.FINISHED, "stop")
        return self._output(seq, new_ids, new_text, text)

    def _output(self, seq: Sequence, new_ids: list[int], new_text: str,
                text: str | None = None) -> RequestOutput:
        finished = seq.status.is_finished
        if finished:
            self._seqs.pop(seq.request.request_id, None)
            self._text.pop(seq.seq_id, None)
        return RequestOutput(
            request_id=seq.request.request_id,
            num_prompt_tokens=len(seq.request.prompt_ids),
            # The final output owns its lists; a running one reads the sequence's in place.
            token_ids=list(seq.output_ids) if finished else Prefix(seq.output_ids),
            new_token_ids=new_ids,
            text=text or "",
            new_text=new_text,
            finished=finished,
            finish_reason=seq.finish_reason,
            error=seq.error,
            logprobs=list(seq.logprobs) if finished else Prefix(seq.logprobs),
        )

    def generate(self, prompts: list[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 adapters: list[str | None] | None = None) -> list[RequestOutput]:
        """Blocking: run every prompt to completion; results in the order given."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        ids = [self.add_request(p, sp, a) for p, sp, a in zip(prompts, params_list, adapters)]
        done: dict[str, RequestOutput] = {}
        text: dict[str, str] = {i: "" for i in ids}
        while self.has_unfinished():
            for out in self.step():
                text[out.request_id] += out.new_text
                if out.finished:
                    out.text = text[out.request_id]
                    done[out.request_id] = out
        return [done[i] for i in ids]

