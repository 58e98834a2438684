"""Bad input gets the right status in OpenAI's error shape while another tenant's traffic goes
on untouched; tenants see only their own adapters (404, never 403); limits answer 429."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.model.sampler import SamplingParams
from tests.server.conftest import MODEL_NAME, start_server, write_keys
from tests.server.test_adapters_api import FILES, upload

KEYS = {"alice": "sk-alice", "bob": "sk-bob", "root": "sk-root"}


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture(scope="module")
def guarded(chat_model, adapter_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guarded")
    keys = write_keys(tmp / "keys.json", {
        "alice": {"keys": [KEYS["alice"]], "max_concurrent_requests": 1, "max_adapters": 2},
        "bob": {"keys": [KEYS["bob"]]},
        "root": {"keys": [KEYS["root"]], "admin": True}})
    srv = start_server(chat_model[1], adapter_store=tmp / "store", api_keys=keys,
                       max_upload_bytes=100_000, allowed_adapter_paths=(adapter_root,))
    yield srv
    srv.stop()


@pytest.fixture
def bob_traffic(guarded, offline):
    """Bob streams greedy completions the whole time; each must equal the offline engine's."""
    stop, failures, done = threading.Event(), [], []
    prompts = [f"Bob's request number {i}" for i in range(4)]
    expected = {p: o.text for p, o in zip(prompts, offline.generate(
        prompts, SamplingParams(max_tokens=12, temperature=0), ["lora8"] * 4))}

    def run() -> None:
        i = 0
        while not stop.is_set():
            p = prompts[i % len(prompts)]
            text = ""
            with httpx.stream("POST", f"{guarded.url}/v1/completions", headers=auth("bob"),
                              json={"model": "lora8", "prompt": p, "max_tokens": 12,
                                    "temperature": 0, "stream": True}, timeout=60) as r:
                if r.status_code != 200:
                    failures.append(r.status_code)
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        text += json.loads(line[6:])["choices"][0]["text"]
            if text != expected[p]:
                failures.append((p, text))
            done.append(p)
            i += 1

    # bob uses an adapter that the admin shares with everyone
    shared = httpx.post(f"{guarded.url}/v1/adapters", headers=auth("root"),
                        json={"name": "lora8", "path": str(offline_path(offline, "lora8")),
                              "shared": True})
    assert shared.status_code in (201, 409), shared.text
    t = threading.Thread(target=run)
    t.start()
    yield
    stop.set()
    t.join(60)
    assert done, "bob's traffic never ran"
    assert not failures, failures


def offline_path(offline, name: str):
    return offline.adapters[name].path


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    assert body["error"]["message"]
    return body["error"]


def test_bad_requests_do_not_disturb_other_tenants(guarded, bob_traffic, adapter_root, tmp_path):
    url, h = guarded.url, auth("alice")
    post = f"{url}/v1/completions"
    error_of(httpx.post(post, headers={**h, "content-type": "application/json"},
                        content=b'{"model": "x", "prompt": '), 400)
    err = error_of(httpx.post(post, headers=h, json={"model": MODEL_NAME, "prompt": "hi",
                                                     "max_tokens": "ten"}), 400)
    assert err["param"] == "max_tokens"
    error_of(httpx.post(post, headers=h, json={"model": MODEL_NAME, "prompt": 5}), 400)
    error_of(httpx.post(post, headers=h, json={"model": "no-such", "prompt": "hi"}), 404)
    err = error_of(httpx.post(post, headers=h, json={"model": MODEL_NAME, "prompt": "hi",
                                                     "max_tokens": 5000}), 400)
    assert "context" in err["message"]
    error_of(httpx.post(f"{url}/v1/chat/completions", headers=h,
                        json={"model": MODEL_NAME, "messages": []}), 400)
    error_of(httpx.post(post, json={"model": MODEL_NAME, "prompt": "hi"}), 401)
    error_of(httpx.post(post, headers={"Authorization": "Bearer sk-wrong"},
                        json={"model": MODEL_NAME, "prompt": "hi"}), 401)
    # uploads: too large, corrupt, wrong shapes
    error_of(upload(url, "big", adapter_root / "lora64", **h), 413)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(adapter_root / "lora8", corrupt)
    (corrupt / FILES["adapter_model"]).write_bytes(b"\x00" * 64 + b"not safetensors")
    assert "safetensors" in error_of(upload(url, "corrupt", corrupt, **h), 400)["message"]
    shapes = tmp_path / "shapes"
    shutil.copytree(adapter_root / "lora8", shapes)
    tensors = load_file(str(shapes / FILES["adapter_model"]))
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[key] = torch.randn(tensors[key].shape[0], tensors[key].shape[1] + 5)
    save_file(tensors, str(shapes / FILES["adapter_model"]))
    assert "do not fit the base" in error_of(upload(url, "shapes", shapes, **h), 400)["message"]
    listed = httpx.get(f"{url}/v1/adapters", headers=h).json()["data"]
    assert not {"big", "corrupt", "shapes"} & {a["id"] for a in listed}


def test_tenants_see_only_their_own_adapters(guarded, adapter_root):
    url = guarded.url
    assert upload(url, "alices", adapter_root / "dora8", **auth("alice")).status_code == 201
    assert httpx.post(f"{url}/v1/completions", headers=auth("alice"), json={
        "model": "alices", "prompt": "hi", "max_tokens": 2}).status_code == 200
    for call in (
        lambda: httpx.post(f"{url}/v1/completions", headers=auth("bob"),
                           json={"model": "alices", "prompt": "hi", "max_tokens": 2}),
        lambda: httpx.get(f"{url}/v1/adapters/alices", headers=auth("bob")),
        lambda: httpx.delete(f"{url}/v1/adapters/alices", headers=auth("bob")),
        lambda: upload(url, "alices", adapter_root / "lora1", "PUT", **auth("bob")),
    ):
        error_of(call(), 404)
    bob_models = {m["id"] for m in httpx.get(f"{url}/v1/models", headers=auth("bob")).json()[
        "data"]}
    assert "alices" not in bob_models
    # bob may use the same name for his own, different adapter
    assert upload(url, "alices", adapter_root / "lora1", **auth("bob")).status_code == 201
    card = httpx.get(f"{url}/v1/adapters/alices", headers=auth("bob")).json()
    assert card["kind"] == "lora" and card["owner"] == "bob"
    assert httpx.get(f"{url}/v1/adapters/alices", headers=auth("alice")).json()["kind"] == "dora"
    # the admin sees everyone's
    root_ids = {a["id"] for a in httpx.get(f"{url}/v1/adapters", headers=auth("root")).json()[
        "data"]}
    assert "alices" in root_ids


def test_limits_answer_429(guarded, adapter_root):
    url, h = guarded.url, auth("alice")
    names = {a["id"] for a in httpx.get(f"{url}/v1/adapters", headers=h).json()["data"]
             if a["owner"] == "alice"}
    for i in range(2 - len(names)):
        assert upload(url, f"fill{i}", adapter_root / "lora1", **h).status_code == 201
    error_of(upload(url, "one-too-many", adapter_root / "lora1", **h), 429)
    # alice may run one request at a time: of several at once, the extra ones get 429
    statuses: list[int] = []

    def call() -> None:
        r = httpx.post(f"{url}/v1/completions", headers=h, timeout=120, json={
            "model": MODEL_NAME, "prompt": "long", "max_tokens": 800, "ignore_eos": True})
        if r.status_code == 429:
            assert error_of(r, 429)["type"] == "rate_limit_error"
        statuses.append(r.status_code)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    assert set(statuses) <= {200, 429}
    # the slot comes back once the request ends
    deadline = time.monotonic() + 10
    while True:
        ok = httpx.post(f"{url}/v1/completions", headers=h,
                        json={"model": MODEL_NAME, "prompt": "third", "max_tokens": 2})
        if ok.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert ok.status_code == 200


def test_admin_shares_an_adapter(guarded, adapter_root):
    url = guarded.url
    assert upload(url, "to-share", adapter_root / "lora1", **auth("bob")).status_code == 201
    body = {"model": "to-share", "prompt": "hi", "max_tokens": 2}
    error_of(httpx.post(f"{url}/v1/completions", headers=auth("alice"), json=body), 404)
    error_of(httpx.patch(f"{url}/v1/adapters/to-share", headers=auth("bob"),
                         json={"shared": True}), 400)  # only an admin shares
    shared = httpx.patch(f"{url}/v1/adapters/bob/to-share", headers=auth("root"),
                         json={"shared": True})
    assert shared.status_code == 200 and shared.json()["shared"] is True
    assert httpx.post(f"{url}/v1/completions", headers=auth("alice"), json=body
                      ).status_code == 200
    httpx.patch(f"{url}/v1/adapters/bob/to-share", headers=auth("root"), json={"shared": False})
    error_of(httpx.post(f"{url}/v1/completions", headers=auth("alice"), json=body), 404)
