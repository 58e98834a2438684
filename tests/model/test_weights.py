"""Model folders: sharded safetensors load to transformers' own tensors, bad folders raise
ModelNotFoundError saying why, GGUF files convert once into a folder transformers agrees with."""

from __future__ import annotations

import json
import shutil
import stat
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraplex.model.config import ModelConfig
from loraplex.model.sampler import SamplingParams
from loraplex.model.weights import (
    ModelNotFoundError,
    convert_gguf,
    demo_gguf_path,
    load_weights,
    resolve_model_dir,
    safetensors_files,
)
from tests.adapter_factory import make_hf_model, save_hf_model
from tests.conftest import assert_pool_clean, make_engine

INDEX = "model.safetensors.index.json"


def expected_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint of `model` holds: its state dict, less a tied lm_head."""
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: biases, tied embeddings
def folders(request, tmp_path_factory: pytest.TempPathFactory):
    """(HF model, single-file folder, sharded folder) of one tiny random model."""
    model = make_hf_model(request.param, seed=3)
    root = tmp_path_factory.mktemp(f"weights-{request.param}")
    single = save_hf_model(model, root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="50KB")
    return model, single, root / "sharded"


def copy_of(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


# ---- loading --------------------------------------------------------------------------------
def test_sharded_folder_has_an_index_and_many_shards(folders):
    _, single, sharded = folders
    weight_map = json.loads((sharded / INDEX).read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 3
    assert safetensors_files(sharded) == [sharded / name for name in shards]
    assert safetensors_files(single) == [single / "model.safetensors"]


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_load_weights_equals_the_hf_state_dict(folders, layout: str):
    model, single, sharded = folders
    weights = load_weights(single if layout == "single" else sharded, torch.float32)
    expected = expected_state(model)
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert weights[name].dtype == torch.float32
        assert torch.equal(weights[name], tensor), name


def test_load_weights_casts_to_the_dtype_asked(folders):
    model, _, sharded = folders
    weights = load_weights(str(sharded), torch.bfloat16, "cpu")
    for name, tensor in expected_state(model).items():
        assert weights[name].dtype == torch.bfloat16
        assert torch.equal(weights[name], tensor.to(torch.bfloat16)), name


def test_engine_over_sharded_folder_generates_as_over_single_file(folders):
    _, single, sharded = folders
    prompts = [[1, 5, 9, 33, 7], [4, 100, 3], list(range(10, 40))]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outputs = []
    for folder in (single, sharded):
        engine = make_engine(folder)
        outputs.append([o.token_ids for o in engine.generate(prompts, params)])
        assert_pool_clean(engine)
    assert outputs[0] == outputs[1]
    assert all(len(tokens) == 8 for tokens in outputs[0])


def test_model_safetensors_wins_over_stray_files(folders, tmp_path: Path):
    """Like transformers: `model.safetensors`, not every `*.safetensors` lying beside it."""
    model, single, _ = folders
    folder = copy_of(single, tmp_path / "with-stray")
    save_file({"model.embed_tokens.weight": torch.zeros(3, 3), "extra.weight": torch.ones(2)},
              str(folder / "zz-consolidated.safetensors"))
    assert safetensors_files(folder) == [folder / "model.safetensors"]
    weights = load_weights(folder, torch.float32)
    expected = expected_state(model)
    assert weights.keys() == expected.keys()
    assert torch.equal(weights["model.embed_tokens.weight"], expected["model.embed_tokens.weight"])


def test_a_single_file_of_another_name_is_found(folders, tmp_path: Path):
    model, single, _ = folders
    folder = copy_of(single, tmp_path / "renamed")
    (folder / "model.safetensors").rename(folder / "weights.safetensors")
    assert safetensors_files(folder) == [folder / "weights.safetensors"]
    assert load_weights(folder, torch.float32).keys() == expected_state(model).keys()


# ---- folders that are not models ------------------------------------------------------------
def test_missing_shard(folders, tmp_path: Path):
    _, _, sharded = folders
    folder = copy_of(sharded, tmp_path / "missing")
    gone = sorted(folder.glob("model-*.safetensors"))[2]
    gone.unlink()
    with pytest.raises(ModelNotFoundError, match=gone.name) as info:
        load_weights(folder, torch.float32)
    assert "missing" in str(info.value) and str(folder) in str(info.value)
    with pytest.raises(ModelNotFoundError, match=gone.name):
        make_engine(folder)


def test_broken_index(folders, tmp_path: Path):
    _, _, sharded = folders
    folder = copy_of(sharded, tmp_path / "broken-index")
    for text in ("{not json", json.dumps({"metadata": {}}), json.dumps({"weight_map": [1, 2]})):
        (folder / INDEX).write_text(text)
        with pytest.raises(ModelNotFoundError, match="index"):
            load_weights(folder, torch.float32)


def test_only_pickle_checkpoint(folders, tmp_path: Path):
    model, single, _ = folders
    folder = tmp_path / "bin-only"
    folder.mkdir()
    shutil.copy(single / "config.json", folder / "config.json")
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    assert resolve_model_dir(folder) == folder  # a model folder, but one we do not read
    with pytest.raises(ModelNotFoundError, match=r"pickle.*safetensors"):
        load_weights(folder, torch.float32)
    with pytest.raises(ModelNotFoundError, match=r"\*\.bin"):
        make_engine(folder)


def test_no_weights_at_all(folders, tmp_path: Path):
    _, single, _ = folders
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(single / "config.json", folder / "config.json")
    with pytest.raises(ModelNotFoundError, match=r"no \*\.safetensors"):
        load_weights(folder, torch.float32)


def test_folder_without_config(folders, tmp_path: Path):
    _, single, _ = folders
    folder = copy_of(single, tmp_path / "no-config")
    (folder / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match="config.json") as info:
        resolve_model_dir(folder)
    assert str(folder) in str(info.value)
    with pytest.raises(ModelNotFoundError, match="config.json"):
        make_engine(folder)
    (folder / "model.Q4.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"model\.Q4\.gguf"):
        resolve_model_dir(folder)


def test_nonexistent_path(tmp_path: Path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelNotFoundError, match="such-model.*not found"):
        resolve_model_dir(missing)
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model_dir(str(missing) + ".gguf")
    with pytest.raises(FileNotFoundError):  # ModelNotFoundError is one: callers may catch either
        make_engine(missing)


def test_a_file_that_is_not_gguf(tmp_path: Path):
    file = tmp_path / "model.bin"
    file.write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf"):
        resolve_model_dir(file)


def test_broken_gguf_leaves_nothing_in_the_cache(tmp_path: Path):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not a gguf file" * 100)
    cache = tmp_path / "cache"
    with pytest.raises(ModelNotFoundError, match="broken.gguf"):
        convert_gguf(gguf, cache_dir=cache)
    assert list((cache / "models").iterdir()) == []


# ---- GGUF -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_convert_gguf_matches_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = demo_gguf_path()
    cache = tmp_path / "cache"
    # An interrupted conversion's leftover, complete-looking: never to be taken for the model.
    leftover = cache / "models" / ".converting-interrupted"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")

    folder = convert_gguf(gguf, cache_dir=cache)
    assert folder.parent == cache / "models" and not folder.name.startswith(".")
    assert sorted(p.name for p in (cache / "models").iterdir()) == sorted(
        [folder.name, leftover.name]), "our own temporary folder is gone"
    assert (leftover / "config.json").read_text() == "{}"
    assert stat.S_IMODE(folder.stat().st_mode) & 0o055 == 0o055, "readable by the whole cache"

    # Config and tokenizer load, as ours and as transformers'.
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama" and config.vocab_size == 49152
    assert ModelConfig.from_dir(folder).num_layers == config.num_hidden_layers
    ours_tok = AutoTokenizer.from_pretrained(folder)
    gguf_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "Héllo 🤗 world\n<|im_start|>user"
    assert ours_tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
    assert ours_tok.eos_token == gguf_tok.eos_token and ours_tok.chat_template

    # Tensors: transformers' own GGUF load is the oracle.
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    expected = expected_state(reference)
    weights = load_weights(folder, torch.float32)
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
    del reference, expected, weights

    # Once: the next call (and resolve_model_dir through the cache variable) reuse the folder.
    (folder / "marker").write_text("kept")
    t0 = time.perf_counter()
    assert convert_gguf(gguf, cache_dir=cache) == folder
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(cache))
    assert resolve_model_dir(gguf) == folder
    assert time.perf_counter() - t0 < 2.0 and (folder / "marker").exists()
