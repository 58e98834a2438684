"""What every route needs (engine bridge, catalog, tenants, metrics) and the FastAPI dependencies
that hand it out: `get_state`, `get_tenant`."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from loraplex.model.tokenizer import Tokenizer
from loraplex.server.auth import ApiKeys, ConcurrencyLimiter, Tenant
from loraplex.server.bridge import EngineBridge
from loraplex.server.catalog import AdapterCatalog, CatalogEntry
from loraplex.server.config import ServeConfig
from loraplex.server.errors import BadRequestError, UnavailableError
from loraplex.server.metrics import Metrics
from loraplex.server.store import AdapterStore

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ServerState:
    config: ServeConfig
    bridge: EngineBridge
    catalog: AdapterCatalog
    tokenizer: Tokenizer | None
    """The server's own tokenizer (the event loop's; the engine thread has its own)."""
    keys: ApiKeys
    limiter: ConcurrencyLimiter
    metrics: Metrics
    store: AdapterStore | None
    model_name: str
    created: int = field(default_factory=lambda: int(time.time()))
    pending_deletes: list[CatalogEntry] = field(default_factory=list)
    """Deleted store adapters whose files wait for their last request to end."""
    prune_candidates: set[tuple[str, str]] = field(default_factory=set)
    """(owner, name) of replaced store adapters whose old versions may be removable."""
    admin_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Serialises adapter creation, replacement and deletion."""

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:20]}"

    def check_accepting(self) -> None:
        if self.bridge.draining:
            raise UnavailableError("the server is shutting down; retry on another replica")

    async def resolve_model(self, tenant: Tenant, model: str) -> str | None:
        """The engine's adapter name for `model` (None for the base model)."""
        if model == self.model_name:
            return None
        entry = self.catalog.find(tenant, model)
        await self.catalog.ensure_registered(entry)
        return entry.engine_name

    def default_max_tokens(self, num_prompt_tokens: int) -> int:
        """Chat without max_tokens: up to the context length (or what the pool can hold)."""
        engine = self.bridge.engine
        pool_tokens = engine.pool.num_pages * engine.kv_layout.page_size // 2
        return max(1, min(engine.max_model_len, pool_tokens) - num_prompt_tokens)

    async def housekeeping(self) -> None:
        """Remove stored files of deleted or replaced versions once no request needs them."""
        if self.store is None or not (self.pending_deletes or self.prune_candidates):
            return
        in_use = [Path(p) for p in await self.bridge.call(lambda e: e.paths_in_use())]
        async with self.admin_lock:
            for entry in list(self.pending_deletes):
                folder = entry.path.parent
                if any(p.parent == folder for p in in_use):
                    continue
                self.pending_deletes.remove(entry)
                if self.catalog.exists(entry.owner, entry.name):  # created again since
                    self.prune_candidates.add((entry.owner, entry.name))
                else:
                    await asyncio.to_thread(self.store.delete, entry.owner, entry.name)
            for owner, name in list(self.prune_candidates):
                stored = await asyncio.to_thread(self.store.get, owner, name)
                if stored is None:
                    self.prune_candidates.discard((owner, name))
                    continue
                keep = {int(p.name[1:]) for p in in_use
                        if p.parent == stored.path.parent and p.name[1:].isdigit()}
                await asyncio.to_thread(self.store.prune, owner, name, keep)
                if keep <= {stored.version}:
                    self.prune_candidates.discard((owner, name))

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise BadRequestError("this model has no tokenizer: send token ids as the prompt")
        return self.tokenizer


def get_state(request: Request) -> ServerState:
    return request.app.state.loraplex


def get_tenant(request: Request) -> Tenant:
    state: ServerState = request.app.state.loraplex
    tenant = state.keys.authenticate(request.headers.get("authorization"))
    request.state.tenant = tenant.name
    return tenant
