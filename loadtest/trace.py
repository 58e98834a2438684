"""S-LoRA-style traces: power-law adapter popularity, gamma arrivals (rate, cv), length ranges.

Pure data, deterministic given the seed; saved and loaded as JSONL. Imports nothing of loraplex.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

_WORDS = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at",
    "from", "his", "it", "an", "were", "are", "which", "this", "be", "or", "has", "had", "not",
    "but", "first", "one", "their", "its", "new", "after", "who", "they", "have", "her", "she",
    "two", "been", "other", "when", "there", "all", "during", "into", "school", "time", "may",
    "years", "more", "most", "only", "over", "city", "some", "world", "would", "where",
    "later", "up", "such", "used", "many", "can", "state", "about", "national", "out", "known",
    "university", "united", "then", "made", "page", "table", "adapter", "tenant", "token",
    "kernel", "batch", "memory", "model", "serve", "request", "rank", "weight", "layer",
    "river", "mountain", "garden", "window", "music", "letter", "market", "winter", "summer",
    "history", "science", "engine",
)
"""Words for text prompts (a prompt of n words is roughly n to 1.5 n tokens)."""


@dataclass(frozen=True, slots=True)
class TraceConfig:
    """What a trace looks like; S-LoRA's synthetic workload knobs (Sheng et al., 2023, §7.1)."""

    num_adapters: int
    """Adapters the requests spread over; named as `workload.make_adapters` names its folders."""
    rate: float
    """Mean arrival rate over all tenants, requests per second."""
    alpha: float = 1.0
    """Popularity exponent: the k-th most popular adapter is picked ∝ k^-alpha (0: uniform)."""
    cv: float = 1.0
    """Coefficient of variation of inter-arrival gaps: 1 is Poisson; otherwise gamma gaps
    with shape 1/cv² (cv > 1: burstier, cv < 1: more regular)."""
    duration_s: float | None = None
    """Arrivals in [0, duration_s); exactly one of this and `num_requests`."""
    num_requests: int | None = None
    """Exactly this many requests; exactly one of this and `duration_s`."""
    input_len: tuple[int, int] = (8, 64)
    """Prompt length range, inclusive: tokens (`prompt_kind` tokens) or words (text)."""
    output_len: tuple[int, int] = (8, 32)
    """`max_tokens` range, inclusive."""
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    """Rank mix: adapter i has rank ranks[i % len(ranks)] (as `make_adapters` builds them)."""
    seed: int = 0
    tenants: tuple[tuple[str, float], ...] = ()
    """(tenant, share): each tenant arrives as its own process at rate · share / Σ shares
    (same cv); empty: one anonymous tenant (None)."""
    prompt_kind: str = "tokens"
    """`tokens` (random ids in [min_token_id, vocab_size)) or `text` (random words)."""
    vocab_size: int = 32000
    min_token_id: int = 100
    """Ids below it are left out: special tokens live there in most vocabularies."""
    popularity_shuffle: bool = True
    """Shuffle which adapter gets which popularity rank (else adapter 0 is the most popular),
    so that popularity and rank are not correlated."""

    def __post_init__(self) -> None:
        if self.num_adapters < 1:
            raise ValueError(f"num_adapters: must be >= 1, got {self.num_adapters}")
        if not self.rate > 0:
            raise ValueError(f"rate: must be > 0, got {self.rate}")
        if self.alpha < 0:
            raise ValueError(f"alpha: must be >= 0, got {self.alpha}")
        if not self.cv > 0:
            raise ValueError(f"cv: must be > 0, got {self.cv}")
        if (self.duration_s is None) == (self.num_requests is None):
            raise ValueError("duration_s / num_requests: give exactly one, got "
                             f"{self.duration_s} / {self.num_requests}")
        for name in ("input_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name}: need 1 <= low <= high, got {(lo, hi)}")
        if not self.ranks or min(self.ranks) < 1:
            raise ValueError(f"ranks: need positive ranks, got {self.ranks}")
        if any(share <= 0 for _, share in self.tenants):
            raise ValueError(f"tenants: shares must be > 0, got {self.tenants}")
        if self.prompt_kind not in ("tokens", "text"):
            raise ValueError(f"prompt_kind: `tokens` or `text`, got {self.prompt_kind!r}")
        if not 0 <= self.min_token_id < self.vocab_size:
            raise ValueError(f"min_token_id: must be in [0, vocab_size), got {self.min_token_id}")

    def adapter_names(self) -> list[str]:
        """The adapters' names, `adapter-0007-r64`: `workload.make_adapters`' folder names."""
        return [adapter_name(i, self.ranks[i % len(self.ranks)])
                for i in range(self.num_adapters)]

    def to_json(self) -> dict:
        return asdict(self)


def adapter_name(index: int, rank: int) -> str:
    return f"adapter-{index:04d}-r{rank}"


@dataclass(slots=True)
class TraceRequest:
    """One request of a trace: when it arrives and what it asks."""

    index: int
    arrival_s: float
    """Seconds after the trace starts."""
    adapter: str | None
    """The adapter's name (the request's `model`); None: the base model."""
    prompt: str | list[int]
    max_tokens: int
    tenant: str | None = None
    extra: dict = field(default_factory=dict)
    """Free-form per-request fields a consumer may use (e.g. a deadline); saved as is."""

    def __repr__(self) -> str:
        kind = "text" if isinstance(self.prompt, str) else "ids"
        return (f"TraceRequest(#{self.index} t={self.arrival_s:.3f}s {self.adapter} "
                f"{kind}[{len(self.prompt)}] max_tokens={self.max_tokens} tenant={self.tenant})")


def _gaps(rng: np.random.Generator, rate: float, cv: float, count: int) -> np.ndarray:
    """`count` inter-arrival gaps with mean 1/rate and coefficient of variation cv."""
    if cv == 1.0:
        return rng.exponential(1.0 / rate, count)
    shape = 1.0 / cv**2  # gamma(k, θ): mean kθ, cv 1/√k
    return rng.gamma(shape, 1.0 / (rate * shape), count)


def _arrivals(rng: np.random.Generator, rate: float, cv: float, duration_s: float | None,
              num_requests: int | None) -> np.ndarray:
    """One process's arrival times: all those before duration_s, or its first num_requests."""
    if num_requests is not None:
        return np.cumsum(_gaps(rng, rate, cv, num_requests))
    assert duration_s is not None, "TraceConfig guarantees one of the two"
    times = np.empty(0)
    expected = max(16, int(rate * duration_s * 1.2) + 16)
    while not times.size or times[-1] < duration_s:
        start = times[-1] if times.size else 0.0
        times = np.concatenate([times, start + np.cumsum(_gaps(rng, rate, cv, expected))])
    return times[times < duration_s]


def generate_trace(config: TraceConfig) -> list[TraceRequest]:
    """The requests of `config`, sorted by arrival; the same config gives the same trace."""
    rng = np.random.default_rng(config.seed)
    tenants = config.tenants or ((None, 1.0),)
    total_share = sum(share for _, share in tenants)
    times, owners = [], []
    for t, (tenant, share) in enumerate(tenants):
        # Each tenant's process on its own stream: adding a tenant leaves the others unchanged.
        sub = np.random.default_rng([config.seed, 1, t])
        arr = _arrivals(sub, config.rate * share / total_share, config.cv, config.duration_s,
                        config.num_requests)
        times.append(arr)
        owners.extend([tenant] * arr.size)
    all_times = np.concatenate(times)
    order = np.argsort(all_times, kind="stable")
    if config.num_requests is not None:
        # Every one of the first n arrivals overall is among the first n of its own tenant.
        order = order[: config.num_requests]
    names = config.adapter_names()
    popularity = np.arange(1, len(names) + 1, dtype=np.float64) ** -config.alpha
    by_rank = rng.permutation(len(names)) if config.popularity_shuffle else np.arange(len(names))
    picks = rng.choice(len(names), size=order.size, p=popularity / popularity.sum())
    in_lo, in_hi = config.input_len
    out_lo, out_hi = config.output_len
    input_lens = rng.integers(in_lo, in_hi + 1, order.size)
    output_lens = rng.integers(out_lo, out_hi + 1, order.size)
    requests = []
    for i, j in enumerate(order):
        requests.append(TraceRequest(
            index=i, arrival_s=float(all_times[j]), adapter=names[by_rank[picks[i]]],
            prompt=_prompt(rng, config, int(input_lens[i])), max_tokens=int(output_lens[i]),
            tenant=owners[j]))
    return requests


def _prompt(rng: np.random.Generator, config: TraceConfig, length: int) -> str | list[int]:
    if config.prompt_kind == "tokens":
        return rng.integers(config.min_token_id, config.vocab_size, length).tolist()
    return " ".join(_WORDS[k] for k in rng.integers(0, len(_WORDS), length))


def save_trace(path: str | Path, requests: list[TraceRequest]) -> Path:
    """One JSON object per line, in arrival order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in requests:
            f.write(json.dumps(asdict(r), separators=(",", ":")) + "\n")
    return path


def load_trace(path: str | Path) -> list[TraceRequest]:
    requests = []
    with Path(path).open() as f:
        for line in f:
            if line.strip():
                requests.append(TraceRequest(**json.loads(line)))
    return requests


def estimate_alpha(counts: list[int] | np.ndarray, top: int | None = None) -> float:
    """The power-law exponent that best fits request counts per adapter (MLE of a Zipf law
    over the adapters seen, by golden-section search); for checking a trace."""
    counts = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    counts = counts[: top or counts.size]
    ranks = np.log(np.arange(1, counts.size + 1))
    n = counts.sum()

    def neg_log_likelihood(a: float) -> float:
        log_norm = math.log(np.exp(-a * ranks).sum())
        return a * float((counts * ranks).sum()) + n * log_norm

    lo, hi = 0.0, 5.0
    inv_phi = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        m1, m2 = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
        if neg_log_likelihood(m1) < neg_log_likelihood(m2):
            hi = m2
        else:
            lo = m1
    return (lo + hi) / 2


def arrival_stats(requests: list[TraceRequest]) -> tuple[float, float]:
    """(rate, cv) of a trace's arrivals: requests per second and the gaps' std / mean."""
    times = np.array([r.arrival_s for r in requests])
    gaps = np.diff(np.concatenate([[0.0], times]))
    return 1.0 / float(gaps.mean()), float(gaps.std() / gaps.mean())
