"""Adapter admin over HTTP: upload, list, show, use, hot-swap during a stream, delete during a
request, vLLM's aliases; every answer checked against an independent offline engine."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import openai
import pytest

from loraplex.model.sampler import SamplingParams
from tests.adapter_factory import AdapterSpec, make_peft_adapter
from tests.server.conftest import MODEL_NAME

FILES = {"adapter_config": "adapter_config.json", "adapter_model": "adapter_model.safetensors"}
LONG = 700  # tokens: a stream long enough to still be running while we swap or delete


def upload(url: str, name: str | None, folder: Path, method: str = "POST", **headers: str
           ) -> httpx.Response:
    files = {field: (fname, (folder / fname).read_bytes()) for field, fname in FILES.items()}
    data = {"name": name} if name is not None else {}
    target = f"{url}/v1/adapters" + (f"/{name}" if method == "PUT" else "")
    return httpx.request(method, target, data=data, files=files, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def versions(chat_model, tmp_path_factory):
    """Three different adapters to upload as successive versions."""
    model, _ = chat_model
    root = tmp_path_factory.mktemp("versions")
    specs = [AdapterSpec(kind="lora", r=4, alpha=8, target_modules=("q_proj", "v_proj"), seed=71),
             AdapterSpec(kind="dora", r=8, alpha=8, target_modules=("k_proj", "o_proj"), seed=72),
             AdapterSpec(kind="shira", r=4, alpha=0, target_modules=("up_proj",), seed=73)]
    return [make_peft_adapter(model, spec, root / f"v{i}") for i, spec in enumerate(specs)]


def greedy(offline, folder: Path, prompt: str, max_tokens: int, *, ignore_eos=False) -> str:
    name = f"oracle-{folder.name}-{folder.parent.name}"
    if name not in offline.adapters:
        offline.add_adapter(name, folder)
    [out] = offline.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0,
                                                      ignore_eos=ignore_eos), [name])
    return out.text


def complete(url: str, model: str, prompt: str, max_tokens: int = 8) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        timeout=60)


def test_upload_list_show_use(server, offline, versions):
    resp = upload(server.url, "up-a", versions[0])
    assert resp.status_code == 201, resp.text
    card = resp.json()
    assert card["id"] == "up-a" and card["kind"] == "lora" and card["rank"] == 4
    assert sorted(card["target_modules"]) == ["q_proj", "v_proj"]
    assert card["num_bytes"] > 0 and card["version"] == 1
    listed = {a["id"] for a in httpx.get(f"{server.url}/v1/adapters").json()["data"]}
    assert "up-a" in listed
    out = complete(server.url, "up-a", "Hello there")
    assert out.status_code == 200
    assert out.json()["choices"][0]["text"] == greedy(offline, versions[0], "Hello there", 8)
    shown = httpx.get(f"{server.url}/v1/adapters/up-a").json()
    assert shown["location"] in ("device", "host") and shown["num_running"] == 0
    assert upload(server.url, "up-a", versions[1]).status_code == 409  # name taken


def test_hot_swap_during_a_running_stream(server, offline, versions):
    assert upload(server.url, "swap", versions[0]).status_code == 201
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    stream = c.completions.create(model="swap", prompt="Once upon a time", max_tokens=LONG,
                                  temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    parts = [next(chunks).choices[0].text]
    swapped = upload(server.url, "swap", versions[1], method="PUT")
    assert swapped.status_code == 200, swapped.text
    assert swapped.json()["version"] == 2 and swapped.json()["kind"] == "dora"
    rest = [ch.choices[0].text for ch in chunks]
    assert len(rest) > 10, "the stream ended before the swap: the test proved nothing"
    assert "".join(parts + rest) == greedy(offline, versions[0], "Once upon a time", LONG,
                                           ignore_eos=True)
    after = complete(server.url, "swap", "Once upon a time").json()["choices"][0]["text"]
    assert after == greedy(offline, versions[1], "Once upon a time", 8)


def test_delete_during_a_running_request(server, offline, versions):
    assert upload(server.url, "doomed", versions[2]).status_code == 201
    result: dict = {}

    def run() -> None:
        result["resp"] = httpx.post(f"{server.url}/v1/completions", json={
            "model": "doomed", "prompt": "Tell me", "max_tokens": LONG, "temperature": 0,
            "ignore_eos": True}, timeout=120)

    t = threading.Thread(target=run)
    t.start()
    while httpx.get(f"{server.url}/v1/adapters/doomed").json().get("num_running", 0) == 0:
        assert t.is_alive(), "the request ended before the delete: the test proved nothing"
    deleted = httpx.delete(f"{server.url}/v1/adapters/doomed")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert complete(server.url, "doomed", "Tell me").status_code == 404
    assert httpx.get(f"{server.url}/v1/adapters/doomed").status_code == 404
    t.join()
    assert result["resp"].status_code == 200
    assert result["resp"].json()["choices"][0]["text"] == greedy(
        offline, versions[2], "Tell me", LONG, ignore_eos=True)


def test_register_by_path_and_vllm_aliases(server, offline, adapter_root):
    ok = httpx.post(f"{server.url}/v1/adapters", json={"name": "by-path",
                                                       "path": str(adapter_root / "lora8")})
    assert ok.status_code == 201, ok.text
    assert complete(server.url, "by-path", "Hi").json()["choices"][0]["text"] == \
        greedy(offline, adapter_root / "lora8", "Hi", 8)
    outside = httpx.post(f"{server.url}/v1/adapters", json={"name": "evil", "path": "/etc"})
    assert outside.status_code == 400
    assert outside.json()["error"]["param"] == "path"
    load = httpx.post(f"{server.url}/v1/load_lora_adapter",
                      json={"lora_name": "vl", "lora_path": str(adapter_root / "shira4")})
    assert load.status_code == 200, load.text
    assert complete(server.url, "vl", "Hi").json()["choices"][0]["text"] == \
        greedy(offline, adapter_root / "shira4", "Hi", 8)
    unload = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "vl"})
    assert unload.status_code == 200
    assert complete(server.url, "vl", "Hi").status_code == 404


def test_base_model_name_and_bad_names_are_refused(server, versions):
    assert upload(server.url, MODEL_NAME, versions[0]).status_code == 409
    assert upload(server.url, "lora8", versions[0]).status_code == 409  # an operator adapter
    bad = upload(server.url, "../escape", versions[0])
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
