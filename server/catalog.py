"""Which adapters exist, who owns them, who may use them, and their names inside the engine.

Sources: `--adapter NAME=DIR` and `--adapter-dir` (the operator's, usable by every tenant) and
the adapter store (tenants' uploads, private unless shared). Registration with the engine is
lazy: an adapter is read and validated the first time it is used or shown.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.scheduler.engine import PreparedAdapter
from loraplex.scheduler.errors import UnknownAdapterError
from loraplex.server.auth import Tenant, can_modify, can_use
from loraplex.server.bridge import EngineBridge
from loraplex.server.store import AdapterStore

logger = logging.getLogger(__name__)

OPERATOR = ""
"""Owner of the adapters the operator configured with flags."""


@dataclass(slots=True)
class CatalogEntry:
    name: str
    """The name tenants use in `model`."""
    owner: str
    shared: bool
    path: Path
    source: str
    """`flag`, `dir` or `store`."""
    version: int = 1
    created: str = ""
    registered: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def engine_name(self) -> str:
        # Tenants' names may collide with each other's: the engine key carries the owner.
        return self.name if self.owner == OPERATOR else f"{self.owner}/{self.name}"


class AdapterCatalog:
    def __init__(self, bridge: EngineBridge, store: AdapterStore | None,
                 adapters: dict[str, Path], adapter_dirs: list[Path]):
        self.bridge = bridge
        self.store = store
        self.adapter_dirs = adapter_dirs
        self._entries: dict[tuple[str, str], CatalogEntry] = {}
        for name, path in adapters.items():
            self._entries[(OPERATOR, name)] = CatalogEntry(name, OPERATOR, True, path, "flag")
        if store is not None:
            for stored in store.list():
                self._entries[(stored.owner, stored.name)] = CatalogEntry(
                    stored.name, stored.owner, stored.shared, stored.path, "store",
                    stored.version, stored.created)

    # ---- lookup --------------------------------------------------------------------------
    def _from_dirs(self, name: str) -> CatalogEntry | None:
        if "/" in name or name.startswith("."):
            return None
        for folder in self.adapter_dirs:
            if (folder / name / "adapter_config.json").is_file():
                entry = CatalogEntry(name, OPERATOR, True, folder / name, "dir")
                self._entries[(OPERATOR, name)] = entry
                return entry
        return None

    def find(self, tenant: Tenant, name: str) -> CatalogEntry:
        """The adapter `name` means for `tenant`; another tenant's private one is not found."""
        entry = self._entries.get((tenant.name, name)) or self._entries.get((OPERATOR, name)) \
            or self._from_dirs(name)
        if entry is None:
            shared = [e for (owner, n), e in sorted(self._entries.items())
                      if n == name and (e.shared or tenant.is_admin)]
            entry = shared[0] if shared else None
        if entry is None and tenant.is_admin and "/" in name:
            entry = self._entries.get(tuple(name.split("/", 1)))  # type: ignore[arg-type]
        if entry is None or not can_use(tenant, entry.owner, entry.shared):
            raise UnknownAdapterError(f"The model `{name}` does not exist.")
        return entry

    def find_own(self, tenant: Tenant, name: str) -> CatalogEntry:
        """For changes: the tenant's own adapter (an admin may name `owner/name`)."""
        key = (tenant.name, name)
        if tenant.is_admin and key not in self._entries and "/" in name:
            key = tuple(name.split("/", 1))  # type: ignore[assignment]
        if tenant.is_admin and key not in self._entries:
            key = (OPERATOR, name)
        entry = self._entries.get(key) or (self._from_dirs(name) if tenant.is_admin else None)
        if entry is None or not can_modify(tenant, entry.owner):
            raise UnknownAdapterError(f"adapter `{name}` does not exist")
        return entry

    def exists(self, owner: str, name: str) -> bool:
        return (owner, name) in self._entries

    def is_operator_name(self, name: str) -> bool:
        return (OPERATOR, name) in self._entries or self._from_dirs(name) is not None

    def visible(self, tenant: Tenant) -> list[CatalogEntry]:
        for folder in self.adapter_dirs:
            for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
                if (OPERATOR, sub.name) not in self._entries:
                    self._from_dirs(sub.name)
        return [e for _, e in sorted(self._entries.items())
                if can_use(tenant, e.owner, e.shared)]

    def flag_entries(self) -> list[CatalogEntry]:
        return [e for e in self._entries.values() if e.source == "flag"]

    def count_owned(self, owner: str) -> int:
        return sum(1 for (o, _) in self._entries if o == owner)

    # ---- changes -------------------------------------------------------------------------
    def put(self, entry: CatalogEntry) -> None:
        self._entries[(entry.owner, entry.name)] = entry

    def remove(self, entry: CatalogEntry) -> None:
        self._entries.pop((entry.owner, entry.name), None)

    async def ensure_registered(self, entry: CatalogEntry) -> None:
        """Read, validate and install the adapter in the engine if it is not there yet."""
        if entry.registered:
            return
        async with entry.lock:
            if entry.registered:
                return
            prepared = await asyncio.to_thread(
                self.bridge.engine.prepare_adapter, entry.engine_name, entry.path)
            await self.install(entry, prepared)

    async def install(self, entry: CatalogEntry, prepared: PreparedAdapter) -> None:
        record = await self.bridge.call(lambda engine: engine.install_adapter(prepared))
        entry.registered = True
        logger.info("adapter %s (owner %r) ready as engine v%d", entry.name, entry.owner,
                    record.version)
