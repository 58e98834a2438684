"""RequestResult: one load-test request's outcome and timings (what runners record and
`report.py` reads). Plain data; imports nothing of ours, and no HTTP client.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(slots=True)
class RequestResult:
    """One request's outcome. Times are seconds after the run's start."""

    index: int
    adapter: str | None
    tenant: str | None
    arrival_s: float
    """When the trace says it arrives (latencies count from here)."""
    sent_s: float | None = None
    """When it went out (later than arrival when the concurrency bound held it)."""
    first_token_s: float | None = None
    end_s: float | None = None
    num_output_tokens: int = 0
    num_prompt_tokens: int | None = None
    chunk_times_s: list[float] = field(default_factory=list)
    """Arrival of each streamed chunk that carried text."""
    status: int = 0
    """HTTP status (0: no response)."""
    error: str | None = None
    finish_reason: str | None = None
    text: str = ""

    @property
    def is_ok(self) -> bool:
        return self.error is None and self.status == 200 and self.end_s is not None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.end_s is None or not self.is_ok else self.end_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if not self.is_ok or self.first_token_s is None or self.num_output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.num_output_tokens - 1)

    def to_json(self) -> dict:
        return {**asdict(self), "ttft_s": self.ttft_s, "tpot_s": self.tpot_s,
                "e2e_s": self.e2e_s}

    @staticmethod
    def from_json(d: dict) -> RequestResult:
        d = {k: v for k, v in d.items() if k not in ("ttft_s", "tpot_s", "e2e_s")}
        return RequestResult(**d)
