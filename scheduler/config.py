"""SchedulerConfig (how much work one step may carry) and EngineConfig (what to serve, with how
much memory, on which path)."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplex.memory.config import MemoryConfig


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
    max_adapter_loads_per_step: int | None = 8
    """Adapters a step may bring into the pool for newly admitted requests; None: no limit.
    Requests on resident adapters go on being admitted past it."""
    max_wait_steps: int = 64
    """Steps after which a waiting request goes first within its tenant, ahead of requests on
    resident adapters (the bound on adapter-aware reordering)."""
    fairness: bool = True
    """Weighted fair share of tokens and batch slots between tenants (virtual token counters);
    False: one queue for all tenants."""

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_wait_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_adapters_per_batch is not None and self.max_adapters_per_batch < 1:
            raise ValueError("max_adapters_per_batch: must be >= 1 or None, got "
                             f"{self.max_adapters_per_batch}")
        if self.max_adapter_loads_per_step is not None and self.max_adapter_loads_per_step < 1:
            raise ValueError("max_adapter_loads_per_step: must be >= 1 or None, got "
                             f"{self.max_adapter_loads_per_step}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {self.max_model_len}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What to serve and with how much memory."""

    model: str | None = None
    """Local HF directory or `.gguf` file; None serves the embedded demo model."""
    dtype: str | None = None
    """float32 / float16 / bfloat16; None: float32 on CPU, the checkpoint's dtype on CUDA."""
    device: str = "auto"
    """`auto`, `cpu` or `cuda`."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    load_tokenizer: bool = True
    """False for token-id-only use (tiny test models ship no tokenizer)."""
    cuda_graphs: bool = True
    """Replay captured CUDA graphs of decode-only steps (CUDA with the Triton kernels only)."""
    cuda_graphs_prefill: bool = False
    """Also graphs of steps with prefill (padded to token buckets). Off by default until it has
    passed the engine tests on a GPU (`loadtest/gpu_session.sh`); checked on the CPU only."""
    shira_fusion: bool = True
    """Scatter a SHiRA adapter into the base weights when a whole batch runs it."""
