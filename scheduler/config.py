"""SchedulerConfig: how much work one step may carry."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Limits of one engine step."""

    max_num_batched_tokens: int = 2048
    """Token budget of a step: one per decoding sequence plus prefill chunks."""
    max_num_seqs: int = 256
    """Sequences running at once."""
    max_model_len: int | None = None
    """Longest prompt + completion; None takes the model's `max_position_embeddings`."""

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {self.max_model_len}")
