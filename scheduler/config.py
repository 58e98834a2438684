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
    max_adapters_per_batch: int | None = None
    """Distinct adapters running at once (the base model counts as one); None: no limit.
    1 switches adapter batching off (the baseline S-LoRA compares against)."""

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_adapters_per_batch is not None and self.max_adapters_per_batch < 1:
            raise ValueError("max_adapters_per_batch: must be >= 1 or None, got "
                             f"{self.max_adapters_per_batch}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {self.max_model_len}")
