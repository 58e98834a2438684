"""`create_app(engine, config)`: routers, the one error shape, request ids and access logs,
health/readiness/metrics, and the lifespan that starts the engine thread and drains it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.model.tokenizer import Tokenizer
from loraplex.scheduler.engine import Engine
from loraplex.server.auth import ApiKeys, ConcurrencyLimiter
from loraplex.server.bridge import EngineBridge
from loraplex.server.catalog import AdapterCatalog
from loraplex.server.config import ServeConfig
from loraplex.server.errors import KNOWN_ERRORS, error_body, error_response
from loraplex.server.metrics import Metrics
from loraplex.server.routes_adapters import router as adapters_router
from loraplex.server.routes_openai import router as openai_router
from loraplex.server.state import ServerState
from loraplex.server.store import AdapterStore

logger = logging.getLogger("loraplex.server")
access_log = logging.getLogger("loraplex.access")
_HOUSEKEEPING_S = 1.0


def build_state(engine: Engine, config: ServeConfig) -> ServerState:
    metrics = Metrics(config.served_model_name or engine.model_name)
    bridge = EngineBridge(engine, metrics)
    store = AdapterStore(config.adapter_store, config.max_upload_bytes) \
        if config.adapter_store else None
    catalog = AdapterCatalog(bridge, store, {n: Path(p) for n, p in config.adapters},
                             [Path(d) for d in config.adapter_dirs])
    keys = ApiKeys.load(config.api_keys) if config.api_keys else ApiKeys.open()
    for tenant in keys.tenants.values():  # before the engine thread starts: safe to call
        engine.set_tenant_weight(tenant.name, tenant.weight)
        engine.set_tenant_deadline(tenant.name, tenant.ttft_deadline_s)
    if keys.is_open:
        logger.warning("no --api-keys file: the server is OPEN, every caller is one tenant "
                       "with admin rights")
    tokenizer = Tokenizer(engine.model_dir) if engine.tokenizer is not None else None
    return ServerState(config=config, bridge=bridge, catalog=catalog, tokenizer=tokenizer,
                       keys=keys, limiter=ConcurrencyLimiter(), metrics=metrics, store=store,
                       model_name=config.served_model_name or engine.model_name)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}", param


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), exc.status_code)

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", None)
        response = error_response(exc, request_id)
        if response.status_code >= 500:
            logger.error("request %s failed", request_id, exc_info=exc)
        return response

    # Known classes are answered without a traceback; anything else is a 500 with one.
    for cls in (*KNOWN_ERRORS, Exception):
        app.add_exception_handler(cls, on_error)


def _install_middleware(app: FastAPI, state: ServerState) -> None:
    @app.middleware("http")
    async def request_context(request: Request, call_next) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        request.state.request_id = request_id
        t0 = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
        finally:
            route = request.scope.get("route")
            template = getattr(route, "path", "unmatched")
            state.metrics.observe_http(template, request.method, status)
            access_log.info("request", extra={
                "request_id": request_id, "method": request.method, "route": template,
                "status": status, "tenant": getattr(request.state, "tenant", None),
                "duration_ms": round((time.perf_counter() - t0) * 1000, 1)})
        response.headers["x-request-id"] = request_id
        return response


def _install_ops_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.bridge.draining:
            return JSONResponse({"status": "draining"}, 503)
        return JSONResponse({"status": "ready", "model": state.model_name})

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)


async def _housekeeping_loop(state: ServerState) -> None:
    while True:
        await asyncio.sleep(_HOUSEKEEPING_S)
        try:
            await state.housekeeping()
        except Exception:
            logger.exception("adapter housekeeping failed")


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    state = build_state(engine, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.bridge.start(asyncio.get_running_loop())
        for entry in state.catalog.flag_entries():  # the operator's adapters: checked at start
            await state.catalog.ensure_registered(entry)
        task = asyncio.create_task(_housekeeping_loop(state))
        logger.info("serving %s", state.model_name)
        try:
            yield
        finally:
            task.cancel()
            await drain(state, config.drain_timeout_s)
            state.bridge.stop()

    app = FastAPI(title="loraplex", lifespan=lifespan)
    app.state.loraplex = state
    _install_handlers(app)
    _install_middleware(app, state)
    _install_ops_routes(app, state)
    app.include_router(openai_router)
    app.include_router(adapters_router)
    return app


async def drain(state: ServerState, timeout_s: float) -> None:
    """Refuse new work; wait for requests in flight to finish, up to `timeout_s`."""
    state.bridge.draining = True
    deadline = time.monotonic() + timeout_s
    while state.bridge.num_in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if state.bridge.num_in_flight:
        logger.warning("drain timeout: %d requests still running", state.bridge.num_in_flight)
