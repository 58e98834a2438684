"""`ServeConfig`: everything `loraplex serve` takes, composed of the layers' own configs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.model.weights import cache_root
from loraplex.scheduler.engine import EngineConfig


def default_store_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_ADAPTER_STORE") or cache_root() / "adapter-store")


@dataclass(frozen=True, slots=True)
class ServeConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    """The base model's name in `model` and /v1/models (default: the model folder's name)."""
    adapters: tuple[tuple[str, Path], ...] = ()
    """`--adapter NAME=DIR`: registered at start, usable by every tenant."""
    adapter_dirs: tuple[Path, ...] = ()
    """`--adapter-dir`: every PEFT adapter folder under it, registered lazily by folder name."""
    adapter_store: Path | None = None
    """Where uploaded adapters are kept durably (None: uploads disabled)."""
    allowed_adapter_paths: tuple[Path, ...] = ()
    """Roots under which `{"name", "path"}` registrations may point (besides adapter dirs)."""
    api_keys: Path | None = None
    """JSON file of keys → tenants; None runs open, as one tenant."""
    max_upload_bytes: int = 512 * 2**20
    drain_timeout_s: float = 30.0
    """On SIGTERM: stop accepting, let running requests finish this long, then exit."""
    log_format: str = "text"
    """`text` or `json` (one object per line)."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port: must be in 1..65535, got {self.port}")
        if self.max_upload_bytes < 1:
            raise ValueError(f"max_upload_bytes: must be positive, got {self.max_upload_bytes}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s: must be ≥ 0, got {self.drain_timeout_s}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format: `text` or `json`, got {self.log_format!r}")
        names = [n for n, _ in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError("adapters: the same name is given twice")
