"""Helpers shared by the adapter-store tests (`test_store.py`, `test_store_durability.py`):
the two PEFT file names, small fake adapters, and one-call upload."""

from __future__ import annotations

import json
import os
from pathlib import Path

from loraplex.server.store import AdapterStore, StoredAdapter

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def files(tag: str = "a", num_weight_bytes: int = 1000) -> dict[str, bytes]:
    return {CONFIG: json.dumps({"tag": tag}).encode(),
            WEIGHTS: (tag.encode() * num_weight_bytes)[:num_weight_bytes]}


def upload(store: AdapterStore, owner: str, name: str, tag: str = "a",
           **kw: bool) -> StoredAdapter:
    return store.commit(store.stage(files(tag)), owner, name, **kw)


def tag_of(path: Path) -> str:
    return json.loads((path / CONFIG).read_text())["tag"]


def staging_entries(store: AdapterStore) -> list[str]:
    return sorted(os.listdir(store.staging))
