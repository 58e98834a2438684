"""Every bad adapter gets its own named error, and the engine keeps serving exactly as before."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.model.adapters.peft import (
    AdapterFormatError,
    AdapterNotFoundError,
    AdapterRankError,
    AdapterShapeError,
    UnsupportedAdapterError,
)
from loraplex.model.sampler import SamplingParams
from tests.adapter_factory import AdapterSpec, make_peft_adapter
from tests.conftest import assert_pool_clean, make_engine

ARCH = "qwen2"
GOOD = AdapterSpec(kind="lora", r=8, alpha=16, target_modules=("q_proj", "v_proj", "down_proj"),
                   seed=41)
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _edit_config(**changes) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = json.loads((d / CONFIG).read_text())
        cfg.update(changes)
        (d / CONFIG).write_text(json.dumps(cfg))
    return edit


def _edit_tensors(fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]):
    def edit(d: Path) -> None:
        save_file(fn(load_file(str(d / WEIGHTS))), str(d / WEIGHTS))
    return edit


def _first_key(tensors: dict, part: str) -> str:
    return sorted(k for k in tensors if part in k)[0]


def _rename_to_lm_head(t: dict) -> dict:
    t = dict(t)
    for part in ("lora_A", "lora_B"):
        key = _first_key(t, f"model.layers.0.self_attn.q_proj.{part}")
        t[key.replace("model.layers.0.self_attn.q_proj", "lm_head")] = t.pop(key)
    return t


def _wrong_shape(t: dict) -> dict:
    t = dict(t)
    key = _first_key(t, "lora_A")
    t[key] = torch.randn(t[key].shape[0], t[key].shape[1] + 3)
    return t


def _nan(t: dict) -> dict:
    t = dict(t)
    key = _first_key(t, "lora_B")
    t[key] = t[key].clone()
    t[key][0, 0] = float("nan")
    return t


def _drop_b(t: dict) -> dict:
    t = dict(t)
    del t[_first_key(t, "lora_B")]
    return t


BAD = {
    "missing-folder": (AdapterNotFoundError, lambda d: shutil.rmtree(d)),
    "missing-weights": (AdapterNotFoundError, lambda d: (d / WEIGHTS).unlink()),
    "missing-config": (AdapterNotFoundError, lambda d: (d / CONFIG).unlink()),
    "not-safetensors": (AdapterFormatError, lambda d: (d / WEIGHTS).write_bytes(b"\x80\x04junk")),
    "bad-json": (AdapterFormatError, lambda d: (d / CONFIG).write_text("{not json")),
    "unsupported-type": (UnsupportedAdapterError, _edit_config(peft_type="IA3")),
    "module-absent": (AdapterShapeError, _edit_tensors(_rename_to_lm_head)),
    "shape-mismatch": (AdapterShapeError, _edit_tensors(_wrong_shape)),
    "missing-b": (AdapterFormatError, _edit_tensors(_drop_b)),
    "non-finite": (AdapterFormatError, _edit_tensors(_nan)),
}


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    base, model_dir = tiny_model_dir(ARCH)
    good = make_peft_adapter(base, GOOD, tmp_path_factory.mktemp("good"))
    engine = make_engine(model_dir, max_rank=32)
    engine.add_adapter("good", good)
    return engine, good


def _reference(engine) -> list[list[int]]:
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = engine.generate([[5, 6, 7, 8], [9, 10, 11]], params, ["good", None])
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_is_refused_and_engine_unharmed(case, setup, tmp_path):
    engine, good = setup
    before = _reference(engine)
    error, damage = BAD[case]
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    damage(bad)
    with pytest.raises(error) as info:
        engine.add_adapter(f"bad-{case}", bad)
    assert str(info.value)  # names the problem
    assert f"bad-{case}" not in engine.adapters
    assert _reference(engine) == before
    assert_pool_clean(engine)


def test_rank_above_maximum_is_refused(setup, tiny_model_dir, tmp_path):
    engine, _ = setup
    base, _ = tiny_model_dir(ARCH)
    big = make_peft_adapter(base, AdapterSpec(kind="lora", r=64, alpha=16,
                                              target_modules=("q_proj",), seed=42), tmp_path)
    before = _reference(engine)
    with pytest.raises(AdapterRankError, match="64"):
        engine.add_adapter("too-big", big)
    assert _reference(engine) == before


def test_unknown_adapter_request_is_refused(setup):
    from loraplex.scheduler.errors import UnknownAdapterError
    engine, _ = setup
    with pytest.raises(UnknownAdapterError):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=2), adapter="nope")
    assert not engine.has_unfinished()
