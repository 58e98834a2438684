"""`/v1/adapters…` (upload, list, show, hot-swap, delete) and vLLM's load/unload aliases.

An upload is staged, validated by the engine's own loader, committed durably, then installed;
nothing is visible before it is valid. Old versions' files go once no request needs them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from loraplex.model.adapters.errors import AdapterError
from loraplex.scheduler.errors import UnknownAdapterError
from loraplex.server.auth import Tenant, check_adapter_limit
from loraplex.server.catalog import CatalogEntry
from loraplex.server.errors import BadRequestError, ConflictError
from loraplex.server.protocol import AdapterPathBody, ShareBody, VllmLoadBody, VllmUnloadBody
from loraplex.server.state import ServerState, get_state, get_tenant
from loraplex.server.store import ADAPTER_FILES, UploadTooLargeError, check_name, is_allowed_path

logger = logging.getLogger(__name__)
router = APIRouter()
_FORM_FIELDS = {"adapter_config": "adapter_config.json",
                "adapter_model": "adapter_model.safetensors"}


# ---- reading the body ----------------------------------------------------------------------
async def _read_body(request: Request, state: ServerState, need_name: bool
                     ) -> tuple[str | None, dict[str, object], bool | None]:
    """(name, the two PEFT files as file objects or bytes, shared flag) from multipart or JSON."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > state.config.max_upload_bytes + 2**20:
        raise UploadTooLargeError(f"upload of {int(length)} bytes is over the limit of "
                                  f"{state.config.max_upload_bytes} bytes")
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=2, max_fields=8)
        files = {}
        for field, filename in _FORM_FIELDS.items():
            item = form.get(field)
            if not isinstance(item, UploadFile):
                raise BadRequestError(f"multipart field `{field}` (the {filename} file) is "
                                      "missing", param=field)
            files[filename] = item.file
        name = form.get("name")
        shared = form.get("shared")
        shared_flag = None if shared is None else str(shared).lower() in ("1", "true", "yes")
        return (str(name) if name is not None else None), files, shared_flag
    try:
        data = json.loads(await request.body() or b"null")
    except ValueError:
        raise BadRequestError("body is neither multipart/form-data nor valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequestError("JSON body must be an object with `path` (and `name`)")
    if not need_name:
        data.setdefault("name", "-")
    body = AdapterPathBody.model_validate(data)
    return body.name, _files_at(state, body.path), body.shared


def _files_at(state: ServerState, path: str) -> dict[str, object]:
    roots = [*state.config.allowed_adapter_paths, *state.config.adapter_dirs]
    if not is_allowed_path(path, list(roots)):
        # Same answer whether or not it exists: the server's file system is not for probing.
        raise BadRequestError("path is not under a directory the operator allows for adapters",
                              param="path")
    folder = Path(path).resolve()
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise BadRequestError(f"adapter folder lacks {', '.join(missing)}", param="path")
    return {f: (folder / f).read_bytes() for f in ADAPTER_FILES}


# ---- create / replace ----------------------------------------------------------------------
async def _store(state: ServerState, tenant: Tenant, name: str, files: dict[str, object],
                 shared: bool | None, replacing: CatalogEntry | None) -> CatalogEntry:
    if state.store is None:
        raise BadRequestError("uploads are disabled: the server runs without an adapter store")
    if shared and not tenant.is_admin:
        raise BadRequestError("only an admin may share an adapter", param="shared")
    owner = replacing.owner if replacing else tenant.name
    staged = await asyncio.to_thread(state.store.stage, files)
    probe = CatalogEntry(name, owner, False, staged, "store")
    try:
        prepared = await asyncio.to_thread(state.bridge.engine.prepare_adapter,
                                           probe.engine_name, staged)
    except AdapterError as exc:  # name the upload, not the server's staging folder
        state.store.discard(staged)
        message = str(exc).replace(f"{staged}/", "").replace(str(staged), "the upload")
        raise type(exc)(message) from None
    except BaseException:
        state.store.discard(staged)
        raise
    try:
        stored = await asyncio.to_thread(state.store.commit, staged, owner, name, shared,
                                         exclusive=replacing is None)
    except BaseException:
        state.store.discard(staged)
        raise
    prepared.record.path = str(stored.path)
    entry = CatalogEntry(name, owner, stored.shared, stored.path, "store", stored.version,
                         stored.created)
    await state.catalog.install(entry, prepared)
    state.catalog.put(entry)
    logger.info("adapter %s/%s v%d stored (%s)", owner, name, stored.version,
                "replaced" if replacing else "new")
    return entry


async def _create(state: ServerState, tenant: Tenant, name: str | None,
                  files: dict[str, object], shared: bool | None) -> JSONResponse:
    state.check_accepting()
    if not name:
        raise BadRequestError("`name` is required", param="name")
    check_name(name, "name")
    async with state.admin_lock:
        if (name == state.model_name or state.catalog.exists(tenant.name, name)
                or state.catalog.is_operator_name(name)):
            raise ConflictError(f"adapter name `{name}` is already taken", param="name")
        check_adapter_limit(tenant, state.catalog.count_owned(tenant.name))
        entry = await _store(state, tenant, name, files, shared, None)
    return JSONResponse(await _info(state, entry), status_code=201)


async def _delete(state: ServerState, tenant: Tenant, name: str) -> dict:
    async with state.admin_lock:
        entry = state.catalog.find_own(tenant, name)
        state.catalog.remove(entry)
        if entry.registered:
            try:
                await state.bridge.call(lambda e: e.remove_adapter(entry.engine_name))
            except UnknownAdapterError:
                pass
        if entry.source == "store":
            # Durably gone at once (also after a crash); files stay for running requests.
            await asyncio.to_thread(state.store.mark_deleted, entry.owner, entry.name)
            state.pending_deletes.append(entry)
    await state.housekeeping()
    return {"id": entry.name, "object": "adapter", "deleted": True}


# ---- routes --------------------------------------------------------------------------------
@router.post("/v1/adapters")
async def create_adapter(request: Request, state: ServerState = Depends(get_state),
                         tenant: Tenant = Depends(get_tenant)):
    name, files, shared = await _read_body(request, state, need_name=True)
    return await _create(state, tenant, name, files, shared)


@router.get("/v1/adapters")
async def list_adapters(state: ServerState = Depends(get_state),
                        tenant: Tenant = Depends(get_tenant)):
    entries = state.catalog.visible(tenant)
    return {"object": "list", "data": [await _info(state, e, parse=False) for e in entries]}


@router.get("/v1/adapters/{name:path}")
async def show_adapter(name: str, state: ServerState = Depends(get_state),
                       tenant: Tenant = Depends(get_tenant)):
    return await _info(state, state.catalog.find(tenant, name))


@router.put("/v1/adapters/{name:path}")
async def replace_adapter(name: str, request: Request, state: ServerState = Depends(get_state),
                          tenant: Tenant = Depends(get_tenant)):
    state.check_accepting()
    _, files, shared = await _read_body(request, state, need_name=False)
    async with state.admin_lock:
        entry = state.catalog.find_own(tenant, name)
        if entry.source != "store":
            raise BadRequestError(f"adapter `{name}` was configured by the operator "
                                  "(--adapter/--adapter-dir) and cannot be replaced over HTTP")
        new = await _store(state, tenant, entry.name, files, shared, entry)
    state.prune_candidates.add((new.owner, new.name))
    await state.housekeeping()
    return await _info(state, new)


@router.patch("/v1/adapters/{name:path}")
async def share_adapter(name: str, body: ShareBody, state: ServerState = Depends(get_state),
                        tenant: Tenant = Depends(get_tenant)):
    """An admin marks a stored adapter shared (every tenant may use it) or private again."""
    if not tenant.is_admin:
        raise BadRequestError("only an admin may change whether an adapter is shared",
                              param="shared")
    async with state.admin_lock:
        entry = state.catalog.find_own(tenant, name)
        if entry.source != "store":
            raise BadRequestError(f"adapter `{name}` is the operator's: it is always shared")
        await asyncio.to_thread(state.store.set_shared, entry.owner, entry.name, body.shared)
        entry.shared = body.shared
    return await _info(state, entry)


@router.delete("/v1/adapters/{name:path}")
async def delete_adapter(name: str, state: ServerState = Depends(get_state),
                         tenant: Tenant = Depends(get_tenant)):
    return await _delete(state, tenant, name)


@router.post("/v1/load_lora_adapter")
async def vllm_load(body: VllmLoadBody, state: ServerState = Depends(get_state),
                    tenant: Tenant = Depends(get_tenant)):
    await _create(state, tenant, body.lora_name, _files_at(state, body.lora_path), None)
    return JSONResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def vllm_unload(body: VllmUnloadBody, state: ServerState = Depends(get_state),
                      tenant: Tenant = Depends(get_tenant)):
    await _delete(state, tenant, body.lora_name)
    return JSONResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


# ---- the adapter's card --------------------------------------------------------------------
async def _info(state: ServerState, entry: CatalogEntry, parse: bool = True) -> dict:
    """Kind, ranks, modules, bytes, version, tier and running requests (parses if asked)."""
    if parse:
        await state.catalog.ensure_registered(entry)
    card = {"id": entry.name, "object": "adapter", "owner": entry.owner or None,
            "shared": entry.shared, "source": entry.source, "version": entry.version,
            "created": entry.created or None, "parent": state.model_name}
    if not entry.registered:
        return {**card, "location": "disk", "num_running": 0}

    def describe(engine: object) -> dict:
        record = engine.adapters[entry.engine_name]
        where, running = engine.adapter_location(entry.engine_name)
        return {"kind": record.kind, "rank": record.max_rank,
                "ranks": record.meta.get("ranks"), "target_modules": list(record.target_modules),
                "num_bytes": record.num_bytes, "location": where, "num_running": running}

    try:
        return {**card, **await state.bridge.call(describe)}
    except (KeyError, UnknownAdapterError):
        return {**card, "location": "disk", "num_running": 0}
