"""Durable adapter store: uploaded PEFT folders under `<root>/<owner>/<name>/v<version>/`.

Plain Python (stdlib only): no FastAPI, no scheduler or model imports. Blocking I/O; call it
from a worker thread. The commit point of an upload is the atomic replace of `meta.json`.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Owner (tenant) and adapter names; used with `fullmatch`, so no `/`, no `..`, no newline."""
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
META_FILE = "meta.json"
STAGING_DIR = ".staging"
_CHUNK_BYTES = 1 << 20
_Meta = dict[str, Any]
"""Parsed `meta.json`: version, shared, created, updated."""
_VERSION_RE = re.compile(r"v([1-9][0-9]{0,17})")


class StoreError(ValueError):
    """Base of every adapter store error (a bad request unless a subclass says otherwise)."""


class InvalidNameError(StoreError):
    """An owner or adapter name that does not match `NAME_RE`."""


class UploadTooLargeError(StoreError):
    """The uploaded files together exceed `max_upload_bytes` (→ 413)."""


class NoSuchAdapterError(StoreError):
    """No committed adapter of that owner and name (→ 404)."""


class AdapterExistsError(StoreError):
    """`commit(..., exclusive=True)` found the name taken (→ 409)."""


@dataclass(frozen=True, slots=True)
class StoredAdapter:
    """One committed adapter version, as `list`/`get`/`commit` report it."""

    owner: str
    """Tenant that uploaded it."""
    name: str
    """Adapter name, unique per owner."""
    version: int
    """1 for the first upload, +1 per replacement."""
    path: Path
    """The version folder holding the two PEFT files."""
    shared: bool
    """Usable by every tenant (set by an admin)."""
    num_bytes: int
    """Total size of the two PEFT files."""
    created: str
    """ISO 8601 UTC time of the adapter's first upload."""


def check_name(value: str, field: str) -> str:
    """Return `value` if it is a valid owner/adapter name, else raise `InvalidNameError`."""
    if not isinstance(value, str) or NAME_RE.fullmatch(value) is None:
        raise InvalidNameError(
            f"invalid {field} {value!r}: expected 1-64 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit")
    return value


def is_allowed_path(path: str | Path, roots: list[Path]) -> bool:
    """True only if absolute `path`, symlinks and `..` resolved, lies inside one of `roots`."""
    try:
        if not str(path) or not Path(path).is_absolute():
            return False
        resolved = Path(path).resolve(strict=False)
        return any(resolved.is_relative_to(Path(root).resolve(strict=False)) for root in roots)
    except (OSError, ValueError, RuntimeError):  # NUL bytes, symlink loops
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _version_of(folder: Path) -> int | None:
    """`v12` → 12; anything else (`v012`, `v1.tmp`) → None."""
    match = _VERSION_RE.fullmatch(folder.name)
    return int(match[1]) if match else None


def _is_complete(version_dir: Path) -> bool:
    return all((version_dir / f).is_file() for f in ADAPTER_FILES)


def _chunks(source: BinaryIO | bytes | bytearray | memoryview) -> Iterator[bytes]:
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source)
        for start in range(0, len(view), _CHUNK_BYTES):
            yield bytes(view[start:start + _CHUNK_BYTES])
        return
    while chunk := source.read(_CHUNK_BYTES):
        if not isinstance(chunk, bytes | bytearray):
            raise StoreError("uploaded files must be opened in binary mode")
        yield bytes(chunk)


class AdapterStore:
    """Adapters on disk that survive restarts and crashes; one process owns a root."""

    def __init__(self, root: Path, max_upload_bytes: int = 512 * 2**20) -> None:
        if max_upload_bytes <= 0:
            raise ValueError(f"max_upload_bytes must be positive, got {max_upload_bytes}")
        self.root = Path(root).resolve()
        self.max_upload_bytes = max_upload_bytes
        self.staging = self.root / STAGING_DIR
        self._lock = threading.RLock()
        self.recover()

    # -- uploads: stage → (caller validates) → commit or discard --------------------------

    def stage(self, files: dict[str, BinaryIO | bytes]) -> Path:
        """Write the two PEFT files into a fresh staging folder, synced; return the folder."""
        names = set(files)
        if names != set(ADAPTER_FILES):
            raise StoreError(f"an adapter upload needs exactly {list(ADAPTER_FILES)}; "
                             f"got {sorted(names)}")
        folder = self.staging / uuid.uuid4().hex
        folder.mkdir(parents=True)
        try:
            num_bytes = 0
            for file_name in ADAPTER_FILES:
                num_bytes = self._write_file(folder / file_name, files[file_name], num_bytes)
            _fsync_dir(folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder

    def _write_file(self, target: Path, source: BinaryIO | bytes, num_bytes: int) -> int:
        with open(target, "xb") as out:
            for chunk in _chunks(source):
                num_bytes += len(chunk)
                if num_bytes > self.max_upload_bytes:
                    raise UploadTooLargeError(
                        f"upload exceeds the limit of {self.max_upload_bytes} bytes")
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        return num_bytes

    def discard(self, staged: Path) -> None:
        """Remove a staged folder (the upload was rejected)."""
        shutil.rmtree(self._check_staged(staged), ignore_errors=True)

    def commit(self, staged: Path, owner: str, name: str, shared: bool | None = None, *,
               exclusive: bool = False) -> StoredAdapter:
        """Make `staged` the next version of `owner/name`; durable once this returns.

        `shared=None` keeps the current flag (False for a new adapter). `exclusive=True`
        raises `AdapterExistsError` if the adapter exists (a create, not a replace).
        """
        staged = self._check_staged(staged)
        adapter_dir = self._adapter_dir(owner, name)
        if not _is_complete(staged):
            raise StoreError(f"staged folder {staged.name} lacks {list(ADAPTER_FILES)}")
        with self._lock:
            raw = self._read_meta(adapter_dir)
            meta = raw if raw is not None and not raw.get("deleted") else None
            if meta is not None and exclusive:
                raise AdapterExistsError(f"adapter {name!r} already exists")
            self._make_dirs(adapter_dir)
            # Versions only grow, also past a deletion: (owner, name, version) names one upload.
            version = max([raw["version"] if raw else 0, *self._versions(adapter_dir)]) + 1
            os.rename(staged, adapter_dir / f"v{version}")
            _fsync_dir(adapter_dir)
            _fsync_dir(self.staging)
            now = _now()
            is_shared = bool(meta.get("shared")) if shared is None and meta else bool(shared)
            self._write_meta(adapter_dir, {
                "version": version, "shared": is_shared,
                "created": meta.get("created", now) if meta else now, "updated": now})
            logger.info("committed adapter %s/%s v%d", owner, name, version)
            return self._record(owner, name, self._read_meta(adapter_dir))

    # -- queries ---------------------------------------------------------------------------

    def list(self, owner: str | None = None) -> builtins.list[StoredAdapter]:
        """The latest committed version of each adapter (of `owner` only, if given)."""
        if owner is not None:
            check_name(owner, "owner")
        found = []
        with self._lock:
            for owner_name in [owner] if owner is not None else self._children(self.root):
                for name in self._children(self.root / owner_name):
                    record = self._load(owner_name, name)
                    if record is not None:
                        found.append(record)
        return found

    def get(self, owner: str, name: str) -> StoredAdapter | None:
        """The latest committed version of `owner/name`, or None."""
        self._adapter_dir(owner, name)
        with self._lock:
            return self._load(owner, name)

    # -- changes ---------------------------------------------------------------------------

    def mark_deleted(self, owner: str, name: str) -> None:
        """Durably hide `owner/name` (gone for `get`/`list`, and after a restart) but keep its
        files for running requests; `delete` or `prune` removes them later."""
        adapter_dir = self._adapter_dir(owner, name)
        with self._lock:
            meta = self._read_meta(adapter_dir)
            if meta is None or meta.get("deleted"):
                raise NoSuchAdapterError(f"no adapter {name!r}")
            self._write_meta(adapter_dir, {**meta, "deleted": True, "updated": _now()})

    def delete(self, owner: str, name: str) -> None:
        """Remove every version of `owner/name` (marked deleted or not) at once: one rename."""
        adapter_dir = self._adapter_dir(owner, name)
        with self._lock:
            if self._read_meta(adapter_dir) is None:
                raise NoSuchAdapterError(f"no adapter {name!r}")
            self._remove(adapter_dir, "deleted")
            with contextlib.suppress(OSError):  # not empty: the owner has other adapters
                adapter_dir.parent.rmdir()
        logger.info("deleted adapter %s/%s", owner, name)

    def set_shared(self, owner: str, name: str, shared: bool) -> StoredAdapter:
        """Set the shared flag of `owner/name`; returns the updated record."""
        adapter_dir = self._adapter_dir(owner, name)
        with self._lock:
            meta = self._read_meta(adapter_dir)
            if meta is None or meta.get("deleted"):
                raise NoSuchAdapterError(f"no adapter {name!r}")
            self._write_meta(adapter_dir, {**meta, "shared": bool(shared), "updated": _now()})
            return self._record(owner, name, self._read_meta(adapter_dir))

    def prune(self, owner: str, name: str, keep_versions: set[int]) -> builtins.list[int]:
        """Remove version folders not in `keep_versions` (never the latest); return them."""
        adapter_dir = self._adapter_dir(owner, name)
        with self._lock:
            meta = self._read_meta(adapter_dir)
            if meta is None:
                return []
            keep = set(keep_versions) | {meta["version"]}
            removed = sorted(v for v in self._versions(adapter_dir) if v not in keep)
            for version in removed:
                self._remove(adapter_dir / f"v{version}", "pruned")
        return removed

    def recover(self) -> None:
        """Bring the root back to committed state after a crash; run by the constructor.

        Empties `.staging`; per adapter keeps only the version that `meta.json` commits (no
        request survives a restart, so older versions are unused); drops adapters marked
        deleted or whose first commit never reached `meta.json`. An unreadable `meta.json` is
        logged and left alone.
        """
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            if self.staging.exists():
                shutil.rmtree(self.staging)
            self.staging.mkdir()
            _fsync_dir(self.root)
            for owner in self._children(self.root):
                for name in self._children(self.root / owner):
                    self._recover_adapter(self.root / owner / name)

    def _recover_adapter(self, adapter_dir: Path) -> None:
        for leftover in adapter_dir.glob(f".{META_FILE}.*"):
            leftover.unlink()
        try:
            meta = self._read_meta(adapter_dir)
        except StoreError as exc:
            logger.error("adapter store: %s; leaving %s untouched", exc, adapter_dir)
            return
        if meta is None or meta.get("deleted"):
            why = "deleted" if meta else "uncommitted"
            logger.warning("adapter store: removing %s adapter %s", why, adapter_dir)
            self._remove(adapter_dir, why)
            return
        for version in self._versions(adapter_dir):
            if version != meta["version"]:
                self._remove(adapter_dir / f"v{version}", "stale")
        if not _is_complete(adapter_dir / f"v{meta['version']}"):
            logger.error("adapter store: committed version of %s is missing files", adapter_dir)

    # -- internals -------------------------------------------------------------------------

    def _adapter_dir(self, owner: str, name: str) -> Path:
        return self.root / check_name(owner, "owner") / check_name(name, "adapter name")

    def _check_staged(self, staged: Path) -> Path:
        staged = Path(staged)
        if staged.parent != self.staging or not staged.is_dir() or staged.is_symlink():
            raise StoreError(f"{staged} is not a folder staged by this store")
        return staged

    def _children(self, folder: Path) -> builtins.list[str]:
        """Sub-folders with valid names, sorted; skips `.staging`, temp files and symlinks."""
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        return [e.name for e in entries
                if e.is_dir(follow_symlinks=False) and NAME_RE.fullmatch(e.name)]

    def _versions(self, adapter_dir: Path) -> builtins.list[int]:
        if not adapter_dir.is_dir():
            return []
        found = (_version_of(p) for p in adapter_dir.iterdir() if p.is_dir())
        return sorted(v for v in found if v is not None)

    def _make_dirs(self, adapter_dir: Path) -> None:
        for folder in (adapter_dir.parent, adapter_dir):
            if not folder.is_dir():
                folder.mkdir()
                _fsync_dir(folder.parent)

    def _remove(self, target: Path, why: str) -> None:
        """Rename `target` into staging (atomic disappearance), then delete it."""
        trash = self.staging / f"{why}-{uuid.uuid4().hex}"
        os.rename(target, trash)
        _fsync_dir(target.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def _read_meta(self, adapter_dir: Path) -> _Meta | None:
        """The committed metadata, None if there is none; `StoreError` if unreadable."""
        try:
            meta = json.loads((adapter_dir / META_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StoreError(f"unreadable {adapter_dir / META_FILE}: {exc}") from exc
        version = meta.get("version") if isinstance(meta, dict) else None
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise StoreError(f"{adapter_dir / META_FILE} has no valid version")
        result: _Meta = meta
        return result

    def _write_meta(self, adapter_dir: Path, meta: _Meta) -> None:
        """Temp file, fsync, `os.replace`, fsync folder: the new meta or the old, never half."""
        tmp = adapter_dir / f".{META_FILE}.{uuid.uuid4().hex}"
        with open(tmp, "x", encoding="utf-8") as out:
            json.dump(meta, out, indent=1, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, adapter_dir / META_FILE)
        _fsync_dir(adapter_dir)

    def _load(self, owner: str, name: str) -> StoredAdapter | None:
        try:
            meta = self._read_meta(self.root / owner / name)
        except StoreError as exc:
            logger.error("adapter store: skipping %s/%s: %s", owner, name, exc)
            return None
        if meta is None or meta.get("deleted") or not _is_complete(
                self.root / owner / name / f"v{meta['version']}"):
            return None
        return self._record(owner, name, meta)

    def _record(self, owner: str, name: str, meta: _Meta | None) -> StoredAdapter:
        assert meta is not None, "a committed adapter has meta.json"
        path = self.root / owner / name / f"v{meta['version']}"
        return StoredAdapter(
            owner=owner, name=name, version=meta["version"], path=path,
            shared=bool(meta.get("shared", False)),
            num_bytes=sum((path / f).stat().st_size for f in ADAPTER_FILES),
            created=str(meta.get("created", "")))
