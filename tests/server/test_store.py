"""The durable adapter store: round trip, names, size limit, restart, crash recovery, paths."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from loraplex.server.store import (
    AdapterExistsError,
    AdapterStore,
    InvalidNameError,
    NoSuchAdapterError,
    StoredAdapter,
    StoreError,
    UploadTooLargeError,
    is_allowed_path,
)

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


def test_round_trip(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    staged = store.stage({CONFIG: io.BytesIO(b'{"r": 8}'), WEIGHTS: b"w" * 3_000_000})
    assert staged.parent == store.staging and sorted(os.listdir(staged)) == [CONFIG, WEIGHTS]
    record = store.commit(staged, "acme", "my-lora_1.0")
    assert (record.owner, record.name, record.version, record.shared) == (
        "acme", "my-lora_1.0", 1, False)
    assert record.path == store.root / "acme" / "my-lora_1.0" / "v1"
    assert (record.path / CONFIG).read_bytes() == b'{"r": 8}'
    assert (record.path / WEIGHTS).read_bytes() == b"w" * 3_000_000
    assert record.num_bytes == 3_000_008
    assert datetime.fromisoformat(record.created).tzinfo is not None
    meta = json.loads((record.path.parent / "meta.json").read_text())
    assert meta["shared"] is False and meta["created"] == record.created
    assert store.get("acme", "my-lora_1.0") == record
    assert store.list() == [record]
    assert staging_entries(store) == []


def test_replace_share_delete(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    first = upload(store, "acme", "x", "one")
    upload(store, "beta", "x", "beta's")
    second = upload(store, "acme", "x", "two")
    assert second.version == 2 and second.created == first.created
    assert tag_of(second.path) == "two" and tag_of(first.path) == "one", "v1 kept until pruned"
    assert [(a.owner, a.version) for a in store.list()] == [("acme", 2), ("beta", 1)]
    assert [a.owner for a in store.list(owner="beta")] == ["beta"]
    assert store.set_shared("acme", "x", True).shared
    third = upload(store, "acme", "x", "three")
    assert third.version == 3 and third.shared, "shared=None keeps the flag"
    assert not upload(store, "acme", "x", "four", shared=False).shared
    with pytest.raises(AdapterExistsError):
        upload(store, "acme", "x", exclusive=True)
    store.delete("acme", "x")
    assert store.get("acme", "x") is None
    assert not (store.root / "acme").exists()
    assert [a.owner for a in store.list()] == ["beta"]
    with pytest.raises(NoSuchAdapterError):
        store.delete("acme", "x")
    with pytest.raises(NoSuchAdapterError):
        store.set_shared("acme", "x", True)
    assert upload(store, "acme", "x", "again").version == 1


def test_mark_deleted_hides_at_once_and_frees_later(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    old = upload(store, "acme", "x", "old", shared=True)
    store.mark_deleted("acme", "x")
    assert store.get("acme", "x") is None and store.list() == []
    assert tag_of(old.path) == "old", "files stay for requests still running on them"
    for call in (lambda: store.mark_deleted("acme", "x"),
                 lambda: store.set_shared("acme", "x", True)):
        with pytest.raises(NoSuchAdapterError):
            call()
    assert AdapterStore(tmp_path).list() == [] and not old.path.exists(), "gone after restart"

    old = upload(store, "acme", "x", "old")
    store.mark_deleted("acme", "x")
    new = upload(store, "acme", "x", "new", exclusive=True)
    assert new.version == 2 and not new.shared, "a new adapter, but no version reused"
    assert store.prune("acme", "x", set()) == [1] and store.get("acme", "x") == new
    store.mark_deleted("acme", "x")
    store.delete("acme", "x")
    assert not (tmp_path / "acme").exists()


def test_exclusive_commit_leaves_staged_folder_to_discard(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    upload(store, "acme", "x")
    staged = store.stage(files("b"))
    with pytest.raises(AdapterExistsError):
        store.commit(staged, "acme", "x", exclusive=True)
    assert staged.is_dir()
    store.discard(staged)
    assert staging_entries(store) == []
    assert store.get("acme", "x").version == 1


def test_prune(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    for tag in "abcd":
        latest = upload(store, "acme", "x", tag)
    folder = latest.path.parent
    assert store.prune("acme", "x", keep_versions={2}) == [1, 3]
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["v2", "v4"]
    assert store.prune("acme", "x", keep_versions=set()) == [2]
    assert store.get("acme", "x") == latest, "the latest version is never pruned"
    assert store.prune("acme", "missing", set()) == []


@pytest.mark.parametrize("bad", [
    "../x", "..", ".", "/etc", "/abs/path", "a/b", "a\\b", "", "a" * 65, "x\n", ".hidden",
    "-x", "_x", "a b", "é", "a\x00b", ".staging",
])
def test_names_refused_everywhere(tmp_path: Path, bad: str) -> None:
    store = AdapterStore(tmp_path / "store")
    staged = store.stage(files())
    calls = [
        lambda: store.commit(staged, bad, "ok"), lambda: store.commit(staged, "ok", bad),
        lambda: store.get(bad, "ok"), lambda: store.get("ok", bad),
        lambda: store.delete(bad, "ok"), lambda: store.delete("ok", bad),
        lambda: store.set_shared("ok", bad, True), lambda: store.prune("ok", bad, set()),
        lambda: store.list(owner=bad),
    ]
    for call in calls:
        with pytest.raises(InvalidNameError):
            call()
    assert sorted(os.listdir(tmp_path)) == ["store"], "nothing written outside the root"
    assert store.list() == []


def test_longest_name_accepted(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    assert upload(store, "A" * 64, "z.9-_" + "q" * 59).version == 1


@pytest.mark.parametrize("names", [
    [CONFIG], [WEIGHTS], [], [CONFIG, WEIGHTS, "extra.bin"], [CONFIG, "adapter_model.bin"],
    ["../" + CONFIG, WEIGHTS],
])
def test_stage_needs_exactly_the_two_files(tmp_path: Path, names: list[str]) -> None:
    store = AdapterStore(tmp_path)
    with pytest.raises(StoreError, match="exactly"):
        store.stage({n: b"x" for n in names})
    assert staging_entries(store) == []


def test_stage_refuses_text_streams(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    with pytest.raises(StoreError, match="binary"):
        store.stage({CONFIG: io.StringIO("{}"), WEIGHTS: b"w"})
    assert staging_entries(store) == []


class EndlessReader:
    """A client that never stops sending; counts how much the store read."""

    def __init__(self) -> None:
        self.num_bytes_read = 0

    def read(self, num_bytes: int = -1) -> bytes:
        chunk = b"\0" * (num_bytes if num_bytes > 0 else 1 << 20)
        self.num_bytes_read += len(chunk)
        return chunk


def test_size_limit(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, max_upload_bytes=10_000)
    assert store.stage({CONFIG: b"c" * 4_000, WEIGHTS: b"w" * 6_000}).is_dir()  # exactly
    with pytest.raises(UploadTooLargeError):
        store.stage({CONFIG: b"c" * 4_000, WEIGHTS: io.BytesIO(b"w" * 6_001)})
    with pytest.raises(UploadTooLargeError):
        store.stage({CONFIG: b"c" * 10_001, WEIGHTS: b""})
    endless = EndlessReader()
    with pytest.raises(UploadTooLargeError):
        store.stage({CONFIG: b"{}", WEIGHTS: endless})
    assert endless.num_bytes_read <= 2 << 20, "stops reading as soon as the limit is passed"
    assert len(staging_entries(store)) == 1, "partial folders removed, the good one kept"
    with pytest.raises(ValueError):
        AdapterStore(tmp_path, max_upload_bytes=0)


def test_commit_and_discard_only_take_staged_folders(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    record = upload(store, "acme", "x")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for name, data in files().items():
        (outside / name).write_bytes(data)
    for bad in (record.path, outside, store.staging / "missing", store.staging / ".." / "acme"):
        with pytest.raises(StoreError):
            store.commit(bad, "acme", "y")
        with pytest.raises(StoreError):
            store.discard(bad)
    assert store.get("acme", "x") == record and (outside / CONFIG).exists()
    half = store.stage(files())
    (half / WEIGHTS).unlink()
    with pytest.raises(StoreError, match="lacks"):
        store.commit(half, "acme", "y")


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


def test_is_allowed_path(tmp_path: Path) -> None:
    roots = [tmp_path / "adapters", tmp_path / "more"]
    for root in roots:
        root.mkdir()
    (roots[0] / "lora").mkdir()
    (tmp_path / "adapters-evil").mkdir()
    (tmp_path / "secret").mkdir()
    (roots[0] / "escape").symlink_to(tmp_path / "secret")
    (roots[0] / "inner-link").symlink_to(roots[0] / "lora")
    (tmp_path / "linked-root").symlink_to(roots[1])
    allowed = [roots[0] / "lora", roots[0], str(roots[1] / "not-yet" / "there"),
               roots[0] / "inner-link", roots[0] / "lora" / ".." / "lora",
               tmp_path / "linked-root" / "x"]
    for path in allowed:
        assert is_allowed_path(path, roots), path
    refused = [roots[0] / ".." / "secret", roots[0] / "escape", roots[0] / "escape" / "x",
               tmp_path / "adapters-evil", tmp_path / "secret", "/etc/passwd", "/",
               "adapters/lora", "../adapters", "", f"{roots[0]}/lora\0x",
               roots[0] / "lora" / ".." / ".." / "secret"]
    for path in refused:
        assert not is_allowed_path(path, roots), path
    assert not is_allowed_path(roots[0] / "lora", [])
    (roots[0] / "loop").symlink_to(roots[0] / "loop")
    assert not is_allowed_path(roots[0] / "loop", [tmp_path / "secret"])
