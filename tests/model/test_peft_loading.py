"""PEFT folder → canonical form: each module's output matches peft's layer; bad folders raise."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from loraplex.model.adapters.canonical import AdapterWeights, LoraModule, ShiraModule
from loraplex.model.adapters.peft import (
    AdapterError,
    AdapterFormatError,
    AdapterNotFoundError,
    AdapterRankError,
    AdapterShapeError,
    UnsupportedAdapterError,
    dora_row_scale,
    load_peft_adapter,
)
from loraplex.model.config import TARGET_MODULES, ModelConfig
from tests.adapter_factory import AdapterSpec, make_hf_model, make_peft_adapter

ALL = TARGET_MODULES
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
TOL = 1e-5
SPECS = {
    "lora": AdapterSpec(kind="lora", r=8, alpha=16, target_modules=ALL, seed=1),
    "lora-r1": AdapterSpec(kind="lora", r=1, alpha=3, target_modules=("q_proj", "down_proj"),
                           seed=2),
    "rslora": AdapterSpec(kind="rslora", r=16, alpha=8, target_modules=ALL, seed=3),
    "pattern": AdapterSpec(kind="pattern", r=8, alpha=16, target_modules=ALL, seed=4),
    "dora": AdapterSpec(kind="dora", r=4, alpha=8, target_modules=ALL, seed=5),
    "shira": AdapterSpec(kind="shira", r=2, alpha=0, target_modules=ALL, seed=6),
}
KIND = {"lora": "lora", "lora-r1": "lora", "rslora": "lora", "pattern": "lora", "dora": "dora",
        "shira": "shira"}


def _parent(module: str) -> str:
    return "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


@pytest.fixture(scope="module")
def base() -> tuple[torch.nn.Module, ModelConfig]:
    model = make_hf_model("qwen2", seed=0)  # qwen2: q/k/v carry biases
    return model, ModelConfig.from_hf_dict(model.config.to_dict())


@pytest.fixture(scope="module")
def adapter_dirs(base, tmp_path_factory) -> dict[str, Path]:
    model, _ = base
    return {name: make_peft_adapter(model, spec, tmp_path_factory.mktemp(name))
            for name, spec in SPECS.items()}


def _base_linear(model: torch.nn.Module, layer: int, module: str) -> torch.nn.Linear:
    return getattr(getattr(model.model.layers[layer], _parent(module)), module)


def _base_weight_fn(model: torch.nn.Module) -> Callable[[int, str], torch.Tensor]:
    return lambda layer, module: _base_linear(model, layer, module).weight.detach()


def _load(base, path: Path, max_rank: int = 64, **kwargs) -> AdapterWeights:
    model, config = base
    kwargs.setdefault("base_weight", _base_weight_fn(model))
    return load_peft_adapter(path, config, max_rank=max_rank, **kwargs)


def _canonical_output(lin: torch.nn.Linear, mod: LoraModule | ShiraModule,
                      x: torch.Tensor) -> torch.Tensor:
    """y for input x [n, d_in] from the base Linear plus the canonical module (naive torch)."""
    w, b = lin.weight.detach(), lin.bias
    wx = x @ w.t()  # [n, d_out]
    bias = torch.zeros(w.shape[0]) if b is None else b.detach()
    if isinstance(mod, ShiraModule):
        sx = torch.zeros_like(wx)
        for k in range(mod.nnz):  # S[rows[k], cols[k]] = values[k]
            sx[:, mod.rows[k]] += mod.values[k] * x[:, mod.cols[k]]
        return wx + bias + mod.scale * sx
    delta = mod.scale * (x @ mod.a.t()) @ mod.b_t  # [n, d_out]
    if mod.row_scale is None:
        return wx + bias + delta
    return mod.row_scale * (wx + delta) + bias


def _assert_matches_peft(base, path: Path, adapter: AdapterWeights) -> None:
    model, config = base
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(path)).eval()
    inner = peft_model.base_model.model
    gen = torch.Generator().manual_seed(0)
    assert adapter.modules, "no modules parsed"
    with torch.no_grad():
        for (layer, module), mod in adapter.modules.items():
            d_out, d_in = config.module_shape(module)
            x = torch.randn(5, d_in, generator=gen)
            lin = _base_linear(model, layer, module)
            expected = _base_linear(inner, layer, module)(x)  # peft's layer: the oracle
            assert (expected - lin(x)).abs().max() > 1e-2, f"adapter is a no-op on {module}"
            got = _canonical_output(lin, mod, x)
            torch.testing.assert_close(got, expected, atol=TOL, rtol=TOL,
                                       msg=f"layer {layer} {module}")
    # every module peft adapted is in ours, and no other
    peft_keys = {(i, m) for i in range(config.num_layers) for m in TARGET_MODULES
                 if hasattr(_base_linear(inner, i, m), "base_layer")}
    assert set(adapter.modules) == peft_keys


@pytest.mark.parametrize("name", sorted(SPECS))
def test_matches_peft_layer_output(name, base, adapter_dirs):
    path = adapter_dirs[name]
    adapter = _load(base, path)
    assert adapter.kind == KIND[name]
    assert adapter.source == str(path)
    assert adapter.meta["peft_type"] == ("SHIRA" if name == "shira" else "LORA")
    assert adapter.target_modules == tuple(m for m in ALL if m in SPECS[name].target_modules)
    for mod in adapter.modules.values():
        tensors = (mod.a, mod.b_t) if isinstance(mod, LoraModule) else (mod.values,)
        assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
        if isinstance(mod, LoraModule):
            assert mod.b_t.is_contiguous() and mod.a.is_contiguous()
        else:
            assert mod.rows.dtype == torch.int32 and mod.cols.dtype == torch.int32
    _assert_matches_peft(base, path, adapter)


def test_pattern_gives_per_module_rank(base, adapter_dirs):
    adapter = _load(base, adapter_dirs["pattern"])
    ranks = {key: mod.rank for key, mod in adapter.modules.items()}
    assert ranks[(0, "q_proj")] == 4 and ranks[(1, "q_proj")] == 8  # dotted-path pattern key
    assert ranks[(0, "down_proj")] == ranks[(1, "down_proj")] == 16  # suffix pattern key
    assert adapter.max_rank == 16


def test_key_variants_without_prefix_and_with_adapter_name(base, adapter_dirs, tmp_path):
    for name in ("dora", "shira"):
        folder = tmp_path / name
        shutil.copytree(adapter_dirs[name], folder)
        tensors = load_file(str(folder / WEIGHTS))
        renamed = {}
        for key, t in tensors.items():
            key = key.removeprefix("base_model.model.")
            key = key.replace(".lora_A.weight", ".lora_A.default.weight")
            key = key.replace(".shira_weight", ".shira_weight.default")
            renamed[key] = t
        save_file(renamed, str(folder / WEIGHTS))
        _assert_matches_peft(base, adapter_dirs[name], _load(base, folder))


def test_dora_row_scale_equals_materialised_norm():
    gen = torch.Generator().manual_seed(3)
    w, a, b = (torch.randn(*s, generator=gen) for s in ((24, 40), (5, 40), (24, 5)))
    m = torch.rand(24, generator=gen) + 0.5
    direct = m.double() / torch.linalg.norm(w.double() + 0.7 * (b.double() @ a.double()), dim=1)
    torch.testing.assert_close(dora_row_scale(w, a, b, 0.7, m), direct.float(), atol=1e-5,
                               rtol=1e-5)


def test_dora_needs_base_weight(base, adapter_dirs):
    with pytest.raises(AdapterError, match="DoRA"):
        _load(base, adapter_dirs["dora"], base_weight=None)
    _load(base, adapter_dirs["lora"], base_weight=None)  # plain LoRA does not


def test_shira_duplicate_indices_are_summed_like_peft(base, adapter_dirs, tmp_path):
    folder = tmp_path / "dup"
    shutil.copytree(adapter_dirs["shira"], folder)
    tensors = load_file(str(folder / WEIGHTS))
    key = sorted(k for k in tensors if k.endswith("q_proj.shira_indices"))[0]
    idx = tensors[key].clone()
    idx[:, 1] = idx[:, 0]
    tensors[key] = idx
    save_file(tensors, str(folder / WEIGHTS))
    adapter = _load(base, folder)
    assert adapter.modules[(0, "q_proj")].nnz == idx.shape[1] - 1
    _assert_matches_peft(base, folder, adapter)


# ---- bad adapters ---------------------------------------------------------------------------

def _config(**changes: object) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = json.loads((d / CONFIG).read_text())
        cfg.update(changes)
        (d / CONFIG).write_text(json.dumps(cfg))
    return edit


def _tensors(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        t = load_file(str(d / WEIGHTS))
        fn(t)
        save_file(t, str(d / WEIGHTS))
    return edit


def _first(t: dict, part: str) -> str:
    return sorted(k for k in t if part in k)[0]


def _rename(old: str, new: str) -> Callable[[dict], None]:
    def fn(t: dict) -> None:
        for key in [k for k in t if old in k]:
            t[key.replace(old, new)] = t.pop(key)
    return fn


def _set(part: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def fn(t: dict) -> None:
        key = _first(t, part)
        t[key] = value(t[key].clone())
    return fn


def _poke(v: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        x.view(-1)[0] = v
        return x
    return fn


def _delete(part: str) -> Callable[[dict], None]:
    return lambda t: t.pop(_first(t, part))


def _bin_only(d: Path) -> None:
    (d / WEIGHTS).unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle")


def _add_lora_bias(t: dict) -> None:
    key = _first(t, "lora_B")
    t[key.replace(".weight", ".bias")] = torch.ones(t[key].shape[0])


L0Q = "model.layers.0.self_attn.q_proj"
BAD: dict[str, tuple[str, type[AdapterError], Callable[[Path], None]]] = {
    "missing-folder": ("lora", AdapterNotFoundError, shutil.rmtree),
    "missing-config": ("lora", AdapterNotFoundError, lambda d: (d / CONFIG).unlink()),
    "missing-weights": ("lora", AdapterNotFoundError, lambda d: (d / WEIGHTS).unlink()),
    "bin-only": ("lora", AdapterFormatError, _bin_only),
    "garbage-safetensors": ("lora", AdapterFormatError,
                            lambda d: (d / WEIGHTS).write_bytes(b"\x12\x00garbage" * 9)),
    "bad-json": ("lora", AdapterFormatError, lambda d: (d / CONFIG).write_text("{not json")),
    "ia3": ("lora", UnsupportedAdapterError, _config(peft_type="IA3")),
    "loha": ("lora", UnsupportedAdapterError, _config(peft_type="LOHA")),
    "fan-in-fan-out": ("lora", UnsupportedAdapterError, _config(fan_in_fan_out=True)),
    "bias-all": ("lora", UnsupportedAdapterError, _config(bias="all")),
    "modules-to-save": ("lora", UnsupportedAdapterError, _config(modules_to_save=["lm_head"])),
    "lora-bias": ("lora", UnsupportedAdapterError, _tensors(_add_lora_bias)),
    "lm-head": ("lora", AdapterShapeError, _tensors(_rename(L0Q, "lm_head"))),
    "embed-tokens": ("lora", AdapterShapeError, _tensors(_rename(L0Q, "model.embed_tokens"))),
    "foo-proj": ("lora", AdapterShapeError, _tensors(_rename("q_proj", "foo_proj"))),
    "layer-out-of-range": ("lora", AdapterShapeError, _tensors(_rename("layers.1.", "layers.7."))),
    "a-shape": ("lora", AdapterShapeError, _tensors(_set("lora_A", lambda x: torch.randn(8, 65)))),
    "b-shape": ("lora", AdapterShapeError,
                _tensors(_set("lora_B", lambda x: torch.randn(x.shape[0], 3)))),
    "rank-vs-config": ("lora", AdapterShapeError, _config(r=4)),
    "missing-a": ("lora", AdapterFormatError, _tensors(_delete("lora_A"))),
    "missing-b": ("lora", AdapterFormatError, _tensors(_delete("lora_B"))),
    "nan": ("lora", AdapterFormatError, _tensors(_set("lora_B", _poke(float("nan"))))),
    "inf": ("lora", AdapterFormatError, _tensors(_set("lora_A", _poke(float("inf"))))),
    "dora-missing-magnitude": ("dora", AdapterFormatError,
                               _tensors(_delete("lora_magnitude_vector"))),
    "dora-magnitude-nan": ("dora", AdapterFormatError,
                           _tensors(_set("lora_magnitude_vector", _poke(float("nan"))))),
    "shira-index-out-of-range": ("shira", AdapterShapeError,
                                 _tensors(_set("shira_indices", _poke(10_000)))),
    "shira-negative-index": ("shira", AdapterShapeError,
                             _tensors(_set("shira_indices", _poke(-1)))),
    "shira-missing-values": ("shira", AdapterFormatError, _tensors(_delete("shira_weight"))),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_raises_its_error(case, base, adapter_dirs, tmp_path):
    source, error, damage = BAD[case]
    folder = tmp_path / "bad"
    shutil.copytree(adapter_dirs[source], folder)
    damage(folder)
    with pytest.raises(error) as info:
        _load(base, folder)
    assert str(folder) in str(info.value), info.value
    if case in ("ia3", "loha"):
        assert case.upper() in str(info.value)
    if case in ("lm-head", "foo-proj", "embed-tokens"):
        assert case.replace("-", "_") in str(info.value)


def test_rank_above_maximum(base, adapter_dirs):
    with pytest.raises(AdapterRankError, match="rank 16 .*maximum rank 8"):
        _load(base, adapter_dirs["rslora"], max_rank=8)
    _load(base, adapter_dirs["rslora"], max_rank=16)


def test_shira_nnz_above_maximum(base, adapter_dirs):
    with pytest.raises(AdapterRankError):  # spec r=2 → nnz = 2·(d_in + d_out)
        _load(base, adapter_dirs["shira"], max_rank=1)
    _load(base, adapter_dirs["shira"], max_rank=2)


@pytest.mark.parametrize("name", ["lora", "dora", "shira"])
def test_cast_to_the_pool_dtype_keeps_values_and_indices(name, base, adapter_dirs):
    """What the host tier holds for a bf16 pool: the parsed fp32 values rounded to bf16 (as the
    pool would round them), indices untouched, half the bytes; a no-op cast returns itself."""
    adapter = _load(base, adapter_dirs[name])
    assert adapter.cast(torch.float32) is adapter
    low = adapter.cast(torch.bfloat16)
    assert low.num_bytes < adapter.num_bytes
    for key, m in adapter.modules.items():
        c = low.modules[key]
        if name == "shira":
            assert torch.equal(c.rows, m.rows) and torch.equal(c.cols, m.cols)
            pairs = [(c.values, m.values)]
        else:
            pairs = [(c.a, m.a), (c.b_t, m.b_t)] + ([(c.row_scale, m.row_scale)]
                                                   if m.row_scale is not None else [])
        assert c.scale == m.scale
        for got, want in pairs:
            assert got.dtype == torch.bfloat16
            assert torch.equal(got.float(), want.float().to(torch.bfloat16).float())
