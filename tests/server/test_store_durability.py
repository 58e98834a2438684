"""The durable adapter store across restarts: exactly the committed adapters come back,
simulated crashes are recovered, and SIGKILL at random points loses no acknowledged adapter."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from loraplex.server.store import AdapterStore

from tests.server.store_helpers import CONFIG, WEIGHTS, files, staging_entries, tag_of, upload


def test_restart_sees_exactly_the_committed(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    upload(store, "acme", "x", "one")
    kept = [upload(store, "acme", "x", "two"), upload(store, "beta", "y", "b")]
    store.set_shared("beta", "y", True)
    kept[1] = store.get("beta", "y")
    upload(store, "acme", "gone")
    store.delete("acme", "gone")
    store.stage(files("never committed"))
    restarted = AdapterStore(tmp_path)
    assert restarted.list() == kept
    assert [tag_of(a.path) for a in restarted.list()] == ["two", "b"]
    assert staging_entries(restarted) == []
    assert not (kept[0].path.parent / "v1").exists(), "old versions are unused after restart"
    assert upload(restarted, "acme", "x", "three").version == 3


def test_recovery_of_simulated_crashes(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    good = upload(store, "acme", "good")
    replaced = upload(store, "acme", "replaced", "old")
    # 1. an upload killed while writing into staging
    partial = store.staging / "deadbeef"
    partial.mkdir()
    (partial / CONFIG).write_bytes(b"{}")
    (partial / WEIGHTS).write_bytes(b"half")
    # 2. a replacement renamed into place but never committed (meta.json not yet written),
    #    and one that even lacks a file
    new_version = replaced.path.parent / "v2"
    new_version.mkdir()
    (new_version / CONFIG).write_bytes(b"{}")
    (replaced.path.parent / "v3").mkdir()
    (replaced.path.parent / ".meta.json.0123abcd").write_text('{"version": 2')
    # 3. a first upload renamed into place before its meta.json: never acknowledged
    (tmp_path / "acme" / "fresh" / "v1").mkdir(parents=True)
    for name, data in files().items():
        (tmp_path / "acme" / "fresh" / "v1" / name).write_bytes(data)
    # 4. a delete renamed away into staging but not yet removed
    deleting = upload(store, "beta", "deleting")
    os.rename(deleting.path.parent, store.staging / "deleted-123")
    # 5. things that are not ours or cannot be read: logged, never deleted
    (tmp_path / "README.txt").write_text("operator notes")
    corrupt = tmp_path / "beta" / "corrupt"
    (corrupt / "v1").mkdir(parents=True)
    (corrupt / "meta.json").write_text("{not json")

    restarted = AdapterStore(tmp_path)
    assert restarted.list() == [good, replaced]
    assert tag_of(restarted.get("acme", "replaced").path) == "old"
    assert sorted(os.listdir(replaced.path.parent)) == ["meta.json", "v1"]
    assert not (tmp_path / "acme" / "fresh").exists()
    assert staging_entries(restarted) == []
    assert (tmp_path / "README.txt").exists() and (corrupt / "meta.json").exists()
    assert restarted.get("beta", "corrupt") is None
    assert upload(restarted, "acme", "replaced", "new").version == 2


def test_committed_version_missing_a_file_is_not_listed(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    record = upload(store, "acme", "x")
    (record.path / WEIGHTS).unlink()
    assert store.get("acme", "x") is None and store.list() == []
    assert AdapterStore(tmp_path).list() == []
    assert (record.path / CONFIG).exists(), "left for the operator to inspect"


CHILD = r"""
import json, sys, time
from pathlib import Path
from loraplex.server.store import AdapterStore

root, mode, first = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
store = AdapterStore(root)

def files(i, name):
    return {"adapter_config.json": json.dumps({"i": i, "name": name}).encode(),
            "adapter_model.safetensors": f"{i}:".encode() * 3000}

class SlowUpload:
    # A client upload of 64 MiB that the parent kills half-way through.
    def __init__(self):
        self.num_chunks = 0
    def read(self, num_bytes=-1):
        self.num_chunks += 1
        if self.num_chunks == 33:
            print("half", flush=True)
        if self.num_chunks > 32:
            time.sleep(0.02)
        return b"\1" * (1 << 20) if self.num_chunks <= 64 else b""

if mode == "upload":
    for name in ("a", "b"):
        record = store.commit(store.stage(files(0, name)), "acme", name)
        print("ok", name, 0, flush=True)
    store.stage({"adapter_config.json": b"{}", "adapter_model.safetensors": SlowUpload()})
    print("finished", flush=True)
else:
    names = ("n0", "n1", "n2")
    i = first
    while True:
        name = names[i % 3]
        record = store.commit(store.stage(files(i, name)), "acme", name)
        print("ok", name, i, flush=True)
        store.prune("acme", name, set())
        i += 1
"""


def run_child(root: Path, mode: str, first: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(root), mode, str(first)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def next_line(child: subprocess.Popen[str]) -> list[str]:
    assert child.stdout is not None and child.stderr is not None
    line = child.stdout.readline()
    assert line, f"child died: {child.stderr.read()}"
    return line.split()


def kill(child: subprocess.Popen[str]) -> list[list[str]]:
    """SIGKILL the child; the lines it printed but we did not read yet (each one an ack)."""
    assert child.stdout is not None
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    return [line.split() for line in child.stdout.read().splitlines()]


def test_sigkill_half_way_through_a_large_upload(tmp_path: Path) -> None:
    child = run_child(tmp_path, "upload", 0)
    lines: list[list[str]] = []
    while not lines or lines[-1] != ["half"]:
        lines.append(next_line(child))
    lines += kill(child)
    assert ["finished"] not in lines
    (partial,) = os.listdir(tmp_path / ".staging")
    num_bytes = (tmp_path / ".staging" / partial / WEIGHTS).stat().st_size
    assert 32 << 20 <= num_bytes < 64 << 20, "killed half-way through writing"

    store = AdapterStore(tmp_path)
    assert [(a.name, tag_of_i(a.path)) for a in store.list()] == [("a", 0), ("b", 0)]
    assert staging_entries(store) == []


def tag_of_i(path: Path) -> int:
    config = json.loads((path / CONFIG).read_text())
    assert (path / WEIGHTS).read_bytes() == f"{config['i']}:".encode() * 3000, "torn adapter"
    return config["i"]


def test_sigkill_at_random_points_loses_no_acknowledged_adapter(tmp_path: Path) -> None:
    rng = random.Random(0)
    committed: dict[str, int] = {}  # name → iteration whose files are the adapter now
    first = 0
    for _ in range(8):
        child = run_child(tmp_path, "loop", first)
        lines = [next_line(child) for _ in range(rng.randint(1, 25))]
        time.sleep(rng.random() * 0.003)  # land anywhere in stage, commit or prune
        num_acks = sum(1 for line in lines + kill(child) if line[0] == "ok")
        for i in range(first, first + num_acks):
            committed[f"n{i % 3}"] = i
        in_flight = first + num_acks  # maybe committed, never acknowledged
        store = AdapterStore(tmp_path)
        listed = {a.name: tag_of_i(a.path) for a in store.list()}
        for name, i in listed.items():
            allowed = {committed.get(name), in_flight if f"n{in_flight % 3}" == name else None}
            assert i in allowed, (name, i, allowed)
            committed[name] = i
        assert set(committed) == set(listed), "an acknowledged adapter was lost"
        assert staging_entries(store) == []
        first = in_flight + 1
    assert first > 8 and len(committed) == 3
