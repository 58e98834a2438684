"""The durable adapter store's API: round trip, replace/share/delete, prune, names, staging
rules, size limit, allowed paths. Restart and crash recovery: `test_store_durability.py`."""

from __future__ import annotations

import io
import json
import os
from datetime import datetime
from pathlib import Path

import pytest
from loraplex.server.store import (
    AdapterExistsError,
    AdapterStore,
    InvalidNameError,
    NoSuchAdapterError,
    StoreError,
    UploadTooLargeError,
    is_allowed_path,
)

from tests.server.store_helpers import CONFIG, WEIGHTS, files, staging_entries, tag_of, upload


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
