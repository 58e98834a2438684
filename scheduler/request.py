"""Request (what the user sent), Sequence (one generation stream), their statuses, and
RequestOutput (what the engine hands back after a step)."""

from __future__ import annotations

import collections.abc
import enum
import itertools
from dataclasses import dataclass, field

import torch

from loraplex.memory.host_cache import AdapterRecord
from loraplex.memory.kv import PageTable
from loraplex.model.sampler import SamplingParams
from loraplex.scheduler.errors import RequestError


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
    arrival_s: float = 0.0
    """The engine clock's time when the request was added."""
    deadline: float | None = None
    """Engine-clock time by which the first token is due (S-LoRA's SLO); None: no objective.
    A waiting request that can no longer meet it is aborted early (finish reason `deadline`)."""

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
    """`stop`, `length`, `abort`, `deadline` or `error`."""
    error: Exception | None = None
    logprobs: list[dict] = field(default_factory=list)
    """Per output token when asked: {"id", "logprob", "top": [(id, logprob), ...]}."""
    num_preemptions: int = 0
    arrival_step: int = 0
    """The scheduler's step count when it was queued (its age is counted in steps)."""

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens start..end of prompt + output (copies only those: decode asks for one)."""
        prompt = self.request.prompt_ids
        p = len(prompt)
        if end <= p:
            return list(prompt[start:end])
        if start >= p:
            return self.output_ids[start - p:end - p]
        return list(prompt[start:]) + self.output_ids[:end - p]

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id}, {self.status.value}, "
                f"prompt={len(self.request.prompt_ids)}, out={len(self.output_ids)}, "
                f"computed={self.num_computed_tokens})")


class Prefix(collections.abc.Sequence):
    """The first n items of an append-only list, read in place: a step's output shows every
    token so far without copying them all at every step (which grows with the output)."""

    __slots__ = ("_items", "_n")

    def __init__(self, items: list, n: int | None = None):
        self._items, self._n = items, len(items) if n is None else n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self._n)
            if step > 0:  # start, stop ≥ 0 here: a plain slice of the list
                return self._items[start:stop:step]
            return [self._items[i] for i in range(start, stop, step)]
        if not -self._n <= index < self._n:
            raise IndexError("Prefix index out of range")
        return self._items[index % self._n]

    def __iter__(self):
        return itertools.islice(self._items, self._n)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (list, tuple, Prefix)):
            return NotImplemented
        return len(other) == self._n and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(list(self))


@dataclass(slots=True)
class RequestOutput:
    """One request's progress after a step (also the final result)."""

    request_id: str
    num_prompt_tokens: int
    token_ids: collections.abc.Sequence[int]
    """All generated tokens so far: a `Prefix` of the sequence's tokens while it runs, a list in
    the final output."""
    new_token_ids: list[int]
    text: str = ""
    new_text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    error: Exception | None = None
    logprobs: collections.abc.Sequence[dict] = field(default_factory=list)
    """Per output token so far when asked (as `token_ids`: a `Prefix` until the final output)."""


def check_deadline(deadline_s: float) -> float:
    """A deadline from outside: seconds > 0 and finite, else `RequestError`."""
    if isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float)) \
            or not 0 < deadline_s < float("inf"):
        raise RequestError(f"deadline_s must be a finite number of seconds > 0, got {deadline_s!r}")
    return float(deadline_s)


def check_prompt_ids(prompt_ids: list[int], vocab_size: int) -> list[int]:
    """A prompt from outside: non-empty token ids in the vocabulary, else `RequestError`."""
    if not prompt_ids:
        raise RequestError("prompt is empty")
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in prompt_ids):
        raise RequestError(f"prompt token ids must be integers in [0, {vocab_size})")
    return prompt_ids
