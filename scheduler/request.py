"""Request (what the user sent), Sequence (one generation stream) and their statuses."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from loraplex.memory.host_cache import AdapterRecord
from loraplex.memory.kv import PageTable
from loraplex.model.sampler import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.ABORTED, RequestStatus.FAILED)


@dataclass(frozen=True, slots=True)
class Request:
    """One generation request as validated by the engine."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    adapter: AdapterRecord | None
    """The adapter version the request runs on (fixed at arrival: hot-swap safe)."""
    tenant: str = ""

    def __repr__(self) -> str:  # never the prompt text
        name = self.adapter.name if self.adapter else None
        return f"Request({self.request_id!r}, prompt={len(self.prompt_ids)} tokens, adapter={name})"


@dataclass(eq=False, slots=True)
class Sequence:
    """The scheduler's unit: tokens so far, pages held, and where generation stands."""

    seq_id: int
    request: Request
    generator: torch.Generator | None
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose K/V are in the pool (0 again after a preemption)."""
    page_table: PageTable = field(default_factory=PageTable)
    adapter_slot: int = -1
    """Row-table slot while the adapter is pinned for this sequence, else -1."""
    finish_reason: str | None = None
    """`stop`, `length`, `abort` or `error`."""
    error: Exception | None = None
    logprobs: list[dict] = field(default_factory=list)
    """Per output token when asked: {"id", "logprob", "top": [(id, logprob), ...]}."""
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        prompt = self.request.prompt_ids
        if end <= len(prompt):
            return list(prompt[start:end])
        return (list(prompt) + self.output_ids)[start:end]

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id}, {self.status.value}, prompt={len(self.request.prompt_ids)},"
                f" out={len(self.output_ids)}, computed={self.num_computed_tokens})")
