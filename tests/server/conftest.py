"""A real loraplex server on 127.0.0.1 (uvicorn on a thread) over a tiny random Llama that
speaks the demo model's tokenizer, with PEFT adapters of every kind built by `peft` itself."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import transformers
import uvicorn

from loraplex.memory.config import MemoryConfig
from loraplex.model.weights import resolve_model_dir
from loraplex.scheduler.config import SchedulerConfig
from loraplex.scheduler.engine import Engine, EngineConfig
from tests.adapter_factory import ALL_MODULES, AdapterSpec, make_peft_adapter

from loraplex.server.app import create_app
from loraplex.server.config import ServeConfig

MODEL_NAME = "tiny-chat"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")
ADAPTER_SPECS = {
    "lora8": AdapterSpec(kind="lora", r=8, alpha=16, target_modules=("q_proj", "v_proj"),
                         seed=101),
    "lora1": AdapterSpec(kind="lora", r=1, alpha=4, target_modules=ALL_MODULES, seed=102),
    "rslora16": AdapterSpec(kind="rslora", r=16, alpha=8, target_modules=ALL_MODULES, seed=103),
    "pattern": AdapterSpec(kind="pattern", r=8, alpha=16, target_modules=ALL_MODULES, seed=104),
    "dora8": AdapterSpec(kind="dora", r=8, alpha=16, target_modules=ALL_MODULES, seed=105),
    "shira4": AdapterSpec(kind="shira", r=4, alpha=0, target_modules=("q_proj", "down_proj"),
                          seed=106),
    "lora64": AdapterSpec(kind="lora", r=64, alpha=32, target_modules=("o_proj", "up_proj"),
                          seed=107),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory) -> tuple[transformers.PreTrainedModel, Path]:
    """A tiny random Llama with SmolLM2's vocabulary, tokenizer and chat template."""
    demo = resolve_model_dir(None)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=1024,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    transformers.set_seed(7)
    model = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("models") / MODEL_NAME
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (demo / name).exists():
            shutil.copy(demo / name, folder / name)
    return model, folder


@pytest.fixture(scope="session")
def adapter_root(chat_model, tmp_path_factory) -> Path:
    """`<root>/<name>/` PEFT folders, one per ADAPTER_SPECS entry."""
    model, _ = chat_model
    root = tmp_path_factory.mktemp("adapters")
    for name, spec in ADAPTER_SPECS.items():
        make_peft_adapter(model, spec, root / name)
    return root


def engine_config(model_dir: Path, num_pages: int = 512) -> EngineConfig:
    return EngineConfig(model=str(model_dir), dtype="float32", device="cpu",
                        memory=MemoryConfig(num_pages=num_pages, max_rank=64,
                                            max_resident_adapters=32),
                        scheduler=SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=128))


@dataclass
class Server:
    url: str
    app: object
    engine: Engine
    thread: threading.Thread
    server: uvicorn.Server
    config: ServeConfig
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def state(self):
        return self.app.state.loraplex

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(model_dir: Path, *, num_pages: int = 512, **serve: object) -> Server:
    engine = Engine(engine_config(model_dir, num_pages))
    config = ServeConfig(engine=engine.config, host="127.0.0.1", port=free_port(),
                         served_model_name=MODEL_NAME, **serve)  # type: ignore[arg-type]
    app = create_app(engine, config)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port,
                                           log_config=None, access_log=False,
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://{config.host}:{config.port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200 and server.started:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    else:
        raise RuntimeError("server did not start")
    return Server(url, app, engine, thread, server, config)


def write_keys(path: Path, tenants: dict[str, dict]) -> Path:
    path.write_text(json.dumps({"tenants": tenants}))
    return path


@pytest.fixture(scope="module")
def server(chat_model, adapter_root, tmp_path_factory):
    """Open server: every test adapter under --adapter-dir, uploads into a temporary store."""
    _, model_dir = chat_model
    srv = start_server(model_dir, adapter_dirs=(adapter_root,),
                       adapter_store=tmp_path_factory.mktemp("store"),
                       allowed_adapter_paths=(adapter_root,))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def offline(chat_model, adapter_root):
    """An independent offline engine over the same model and adapters (the HTTP oracle)."""
    _, model_dir = chat_model
    engine = Engine(engine_config(model_dir))
    for name in ADAPTER_SPECS:
        engine.add_adapter(name, adapter_root / name)
    return engine
