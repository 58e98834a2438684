"""Sampling: greedy, temperature, top-k, top-p, per-request seeds, log-probabilities.

Every row of a batch is sampled by its own rule and, when the request has a seed, from its own
generator, so a seeded request draws the same tokens whatever else shares its batch.
The filters follow `transformers`' logits warpers (temperature, then top-k, then top-p).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20
"""Most top alternatives a request may ask for (OpenAI's limit)."""

_GREEDY_TEMPERATURE = 1e-5
"""Below this a temperature is greedy: logits / 1e-39 overflow to inf and softmax gives NaN
(vLLM's `_SAMPLING_EPS`)."""

_SEED_RANGE = (-(2**63), 2**64 - 1)
"""What `torch.Generator.manual_seed` accepts; outside it, it raises a bare ValueError."""


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; the message names it."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    """0 (anything below 1e-5) means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 (or -1) keeps every token."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    """None: no log-probabilities; k ≥ 0: the chosen token's and the k most likely ones'."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _as_tuple("stop", self.stop))
        object.__setattr__(self, "stop_token_ids",
                           _as_tuple("stop_token_ids", self.stop_token_ids))
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise SamplingParamsError(f"max_tokens must be an integer ≥ 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise SamplingParamsError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise SamplingParamsError(
                f"top_k must be -1, 0 or a positive integer, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed)
                                      or not _SEED_RANGE[0] <= self.seed <= _SEED_RANGE[1]):
            raise SamplingParamsError(f"seed must be an integer in [-2**63, 2**64 - 1], "
                                      f"got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingParamsError("stop must be non-empty strings")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise SamplingParamsError("stop_token_ids must be non-negative integers")
        if self.logprobs is not None and (not _is_int(self.logprobs)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise SamplingParamsError(
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_TEMPERATURE or self.top_k == 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_tuple(name: str, value: object) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise SamplingParamsError(f"{name} must be a list, got {value!r}") from None


@dataclass(slots=True)
class SampleOutput:
    token_ids: torch.Tensor
    """[N] int64 the chosen tokens."""
    logprobs: torch.Tensor | None = None
    """[N] fp32 log-probability of each chosen token (when any row asked)."""
    top_ids: torch.Tensor | None = None
    """[N, k] the k most likely tokens, k the largest any row asked for (k may be 0; at most
    the vocabulary size)."""
    top_logprobs: torch.Tensor | None = None


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A request's own random stream (None: draw from the global one)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k and then top-p remove, row by row.

    logits: [N, V] fp32 (already divided by the temperature); top_k: [N] int64, 0 keeps all;
    top_p: [N] fp64, 1 keeps all (fp64 as the Python floats transformers compares with).
    """
    vocab = logits.shape[-1]
    sorted_logits, _ = logits.sort(dim=-1, descending=True)
    k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    kth = sorted_logits.gather(1, (k - 1)[:, None])
    logits = logits.masked_fill(logits < kth, float("-inf"))
    # top-p as transformers does it: ascending order, drop while the mass so far ≤ 1 - p,
    # always keeping the most likely token.
    asc, asc_idx = logits.sort(dim=-1)
    cum = asc.softmax(dim=-1).cumsum(dim=-1)
    # The threshold as transformers has it: 1 - p in double, then compared in fp32; 1 - p in
    # fp32 differs by an ulp (0.9 → 0.10000002 instead of 0.1) and moves the boundary.
    remove = cum <= (1 - top_p.double()).to(cum.dtype)[:, None]
    remove[:, -1] = False
    remove = remove.scatter(1, asc_idx, remove)
    return logits.masked_fill(remove, float("-inf"))


class Sampler:
    """One token per row of logits, each row by its request's parameters."""

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> SampleOutput:
        logits = logits.float()
        n = logits.shape[0]
        device = logits.device
        token_ids = logits.argmax(dim=-1)
        if not all(p.is_greedy for p in params):  # decided on the host: no device sync
            greedy = torch.tensor([p.is_greedy for p in params], device=device)
            temps = torch.tensor([p.temperature if not p.is_greedy else 1.0 for p in params],
                                 device=device)
            scaled = logits / temps[:, None]
            if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
                top_k = torch.tensor([p.top_k for p in params], device=device)
                top_p = torch.tensor([p.top_p for p in params], dtype=torch.float64,
                                     device=device)
                scaled = apply_top_k_top_p(scaled, top_k, top_p)
            probs = scaled.softmax(dim=-1)
            # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; each seeded row
            # takes its noise from its own generator, unseeded rows share one draw.
            noise = torch.empty_like(probs).exponential_()
            for i, g in enumerate(generators):
                if g is not None and not params[i].is_greedy:
                    noise[i].exponential_(generator=g)
            # exponential_ may return 0 (pytorch#22557, #48841): 0 / 0 is NaN, and argmax
            # takes NaN, which would pick a token that top-k/top-p removed.
            noise.clamp_min_(torch.finfo(noise.dtype).tiny)
            sampled = (probs / noise).argmax(dim=-1)
            token_ids = torch.where(greedy, token_ids, sampled)
        out = SampleOutput(token_ids=token_ids)
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        if wanted:
            logp = logits.log_softmax(dim=-1)
            out.logprobs = logp.gather(1, token_ids[:, None])[:, 0]
            k = min(max(wanted), logits.shape[-1])
            out.top_logprobs, out.top_ids = logp.topk(k, dim=-1) if k else (
                logp.new_empty(n, 0), token_ids.new_empty(n, 0))
        return out
