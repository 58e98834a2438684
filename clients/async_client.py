"""`AsyncLoraplexClient`: `LoraplexClient`'s methods as coroutines, the streams as async
iterators. Shared pieces live in `loraplex.clients.common`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
from loraplex.clients.common import (
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    LoraplexConnectionError,
    SSEParser,
    _adapter_path,
    _Base,
    _body,
    _check,
    _connection_error,
    _headers,
    _json,
    _open_adapter,
)

logger = logging.getLogger(__name__)


class AsyncLoraplexClient(_Base):
    """`LoraplexClient`'s methods as coroutines; the streams are async iterators."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S) -> None:
        super().__init__(base_url, api_key, timeout)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=_headers(api_key),
                                       timeout=self.timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        logger.debug("%s %s%s", method, self.base_url, path)
        try:
            return _json(await self._http.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            raise _connection_error(self.base_url, exc) from exc

    async def _stream(self, path: str, body: dict) -> AsyncIterator[dict]:
        parser = SSEParser()
        try:
            async with self._http.stream("POST", path, json=body,
                                         headers={"accept": "text/event-stream"}) as response:
                if response.is_error:
                    await response.aread()
                    _check(response)
                async for line in response.aiter_lines():
                    if (payload := parser.feed(line)) is not None:
                        yield payload
                    if parser.done:
                        return
        except httpx.TransportError as exc:
            raise _connection_error(self.base_url, exc) from exc
        if (payload := parser.close()) is not None:
            yield payload
        if not parser.done:
            raise LoraplexConnectionError(f"stream from {self.base_url}{path} ended before "
                                          "[DONE]")

    async def _model(self, model: str | None) -> str:
        if model is not None:
            return model
        if self._base_model is None:
            self._base_model = self._first_model(await self.models())
        return self._base_model

    # ---- generation ----
    async def complete(self, prompt: str | list, model: str | None = None,
                       **params: Any) -> dict:
        body = _body("prompt", prompt, await self._model(model), params, False)
        return await self._request("POST", "/v1/completions", json=body)

    async def complete_stream(self, prompt: str | list, model: str | None = None,
                              **params: Any) -> AsyncIterator[dict]:
        body = _body("prompt", prompt, await self._model(model), params, True)
        async for chunk in self._stream("/v1/completions", body):
            yield chunk

    async def chat(self, messages: list[dict], model: str | None = None, **params: Any) -> dict:
        body = _body("messages", messages, await self._model(model), params, False)
        return await self._request("POST", "/v1/chat/completions", json=body)

    async def chat_stream(self, messages: list[dict], model: str | None = None,
                          **params: Any) -> AsyncIterator[dict]:
        body = _body("messages", messages, await self._model(model), params, True)
        async for chunk in self._stream("/v1/chat/completions", body):
            yield chunk

    async def models(self) -> dict:
        return await self._request("GET", "/v1/models")

    # ---- adapter admin ----
    async def list_adapters(self) -> list[dict]:
        return (await self._request("GET", "/v1/adapters"))["data"]

    async def get_adapter(self, name: str) -> dict:
        return await self._request("GET", _adapter_path(name))

    async def upload_adapter(self, name: str, folder: str | Path,
                             shared: bool | None = None) -> dict:
        data = {"name": name} if shared is None else {"name": name, "shared": str(shared).lower()}
        with contextlib.ExitStack() as stack:
            files = _open_adapter(folder, stack)
            return await self._request("POST", "/v1/adapters", data=data, files=files)

    async def register_adapter_path(self, name: str, path: str | Path) -> dict:
        return await self._request("POST", "/v1/adapters",
                                   json={"name": name, "path": str(path)})

    async def replace_adapter(self, name: str, folder: str | Path) -> dict:
        with contextlib.ExitStack() as stack:
            return await self._request("PUT", _adapter_path(name),
                                       files=_open_adapter(folder, stack))

    async def delete_adapter(self, name: str) -> dict:
        return await self._request("DELETE", _adapter_path(name))

    # ---- operations ----
    async def health(self) -> dict:
        return await self._request("GET", "/health")

    async def ready(self) -> dict:
        return await self._request("GET", "/ready")
