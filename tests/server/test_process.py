"""`loraplex serve` as a real process: SIGTERM drains running requests and exits 0; SIGKILL
during an upload loses nothing acknowledged and keeps nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import MODEL_NAME, free_port
from tests.server.test_adapters_api import FILES, upload

pytestmark = pytest.mark.slow


def spawn(model_dir: Path, port: int, store: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "loraplex.server.cli", "serve", "--model", str(model_dir),
           "--served-model-name", MODEL_NAME, "--port", str(port), "--device", "cpu",
           "--dtype", "float32", "--pool-mib", "16", "--adapter-store", str(store),
           "--drain-timeout", "60"]
    proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start:\n" + log.read_text()[-3000:])


def greedy(url: str, model: str, prompt: str) -> str:
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt,
                                                   "max_tokens": 10, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_sigterm_drains_running_requests_and_exits_zero(chat_model, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = spawn(chat_model[1], port, tmp_path / "store", tmp_path / "log.txt")
    results: list[tuple[int, int]] = []
    started = threading.Barrier(4)

    def stream_one(i: int) -> None:
        n = 0
        with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
                "model": MODEL_NAME, "prompt": f"request {i}", "max_tokens": 300,
                "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            started.wait()
            usage = None
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    n += 1
        results.append((r.status_code, usage["completion_tokens"] if usage else -1))

    threads = [threading.Thread(target=stream_one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    started.wait()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:  # new work is refused: 503 while draining, or no listener at all
        refused = httpx.post(f"{url}/v1/completions", json={"model": MODEL_NAME,
                                                            "prompt": "late"}, timeout=5)
        assert refused.status_code == 503
    except httpx.TransportError:
        pass
    for t in threads:
        t.join(120)
    assert proc.wait(120) == 0
    assert sorted(results) == [(200, 300)] * 3


def _slow_multipart_upload(port: int, name: str, folder: Path, sent: threading.Event) -> None:
    """Send a multipart upload's headers and half its body, then stall (until killed)."""
    boundary = "loraplexboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'
             .encode()]
    for field, fname in FILES.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                     f'filename="{fname}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                     .encode() + (folder / fname).read_bytes() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (f"POST /v1/adapters HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head + body[: len(body) // 2])
        sent.set()
        time.sleep(30)


def test_sigkill_keeps_acknowledged_adapters_only(chat_model, adapter_root, tmp_path):
    store, log = tmp_path / "store", tmp_path / "log.txt"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = spawn(chat_model[1], port, store, log)
    before = {}
    for name, src in (("kept-a", "dora8"), ("kept-b", "shira4"), ("kept-c", "lora8")):
        assert upload(url, name, adapter_root / src).status_code == 201
        before[name] = greedy(url, name, "Same prompt before and after")
    assert httpx.delete(f"{url}/v1/adapters/kept-c").status_code == 200
    del before["kept-c"]
    sent = threading.Event()
    threading.Thread(target=_slow_multipart_upload, daemon=True,
                     args=(port, "interrupted", adapter_root / "rslora16", sent)).start()
    assert sent.wait(30)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = spawn(chat_model[1], port, store, log)
    try:
        listed = {a["id"] for a in httpx.get(f"{url}/v1/adapters").json()["data"]}
        assert listed == set(before)
        for name, text in before.items():
            assert greedy(url, name, "Same prompt before and after") == text
        assert not any((store / ".staging").glob("*")) if (store / ".staging").exists() else True
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
