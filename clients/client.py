"""HTTP clients for a loraplex server: `LoraplexClient` (sync) lives here, with OpenAI
completions/chat (plain and SSE streaming) and adapter admin. `AsyncLoraplexClient`
(`async_client.py`) and the shared errors, SSE parser and helpers (`common.py`) are re-exported,
so every public name still imports from `loraplex.clients.client`. Speaks only HTTP: imports
nothing of the server or the engine."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
from loraplex.clients.async_client import AsyncLoraplexClient
from loraplex.clients.common import (
    ADAPTER_FILES,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    AdapterFolderError,
    LoraplexAPIError,
    LoraplexConnectionError,
    LoraplexError,
    SSEParser,
    _adapter_path,
    _Base,
    _body,
    _check,
    _connection_error,
    _headers,
    _json,
    _open_adapter,
    text_of,
)

__all__ = [
    "ADAPTER_FILES",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_URL",
    "AdapterFolderError",
    "AsyncLoraplexClient",
    "LoraplexAPIError",
    "LoraplexClient",
    "LoraplexConnectionError",
    "LoraplexError",
    "SSEParser",
    "text_of",
]

logger = logging.getLogger(__name__)


class LoraplexClient(_Base):
    """Blocking client. `model=None` means the server's base model (first of /v1/models)."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S) -> None:
        super().__init__(base_url, api_key, timeout)
        self._http = httpx.Client(base_url=self.base_url, headers=_headers(api_key),
                                  timeout=self.timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        logger.debug("%s %s%s", method, self.base_url, path)
        try:
            return _json(self._http.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            raise _connection_error(self.base_url, exc) from exc

    def _stream(self, path: str, body: dict) -> Iterator[dict]:
        parser = SSEParser()
        try:
            with self._http.stream("POST", path, json=body,
                                   headers={"accept": "text/event-stream"}) as response:
                if response.is_error:
                    response.read()
                    _check(response)
                for line in response.iter_lines():
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

    def _model(self, model: str | None) -> str:
        if model is not None:
            return model
        if self._base_model is None:
            self._base_model = self._first_model(self.models())
        return self._base_model

    # ---- generation ----
    def complete(self, prompt: str | list, model: str | None = None, **params: Any) -> dict:
        """POST /v1/completions; `params` are OpenAI's (and `top_k`, `ignore_eos`)."""
        return self._request("POST", "/v1/completions",
                             json=_body("prompt", prompt, self._model(model), params, False))

    def complete_stream(self, prompt: str | list, model: str | None = None,
                        **params: Any) -> Iterator[dict]:
        """Streamed /v1/completions: one parsed chunk per SSE event, up to `[DONE]`."""
        return self._stream("/v1/completions",
                            _body("prompt", prompt, self._model(model), params, True))

    def chat(self, messages: list[dict], model: str | None = None, **params: Any) -> dict:
        """POST /v1/chat/completions."""
        return self._request("POST", "/v1/chat/completions",
                             json=_body("messages", messages, self._model(model), params, False))

    def chat_stream(self, messages: list[dict], model: str | None = None,
                    **params: Any) -> Iterator[dict]:
        """Streamed /v1/chat/completions: `chat.completion.chunk` dicts."""
        return self._stream("/v1/chat/completions",
                            _body("messages", messages, self._model(model), params, True))

    def models(self) -> dict:
        return self._request("GET", "/v1/models")

    # ---- adapter admin ----
    def list_adapters(self) -> list[dict]:
        return self._request("GET", "/v1/adapters")["data"]

    def get_adapter(self, name: str) -> dict:
        return self._request("GET", _adapter_path(name))

    def upload_adapter(self, name: str, folder: str | Path, shared: bool | None = None) -> dict:
        """Upload a local PEFT folder (adapter_config.json + adapter_model.safetensors)."""
        data = {"name": name} if shared is None else {"name": name, "shared": str(shared).lower()}
        with contextlib.ExitStack() as stack:
            files = _open_adapter(folder, stack)
            return self._request("POST", "/v1/adapters", data=data, files=files)

    def register_adapter_path(self, name: str, path: str | Path) -> dict:
        """Register a folder on the server's own disk (under a directory it allows)."""
        return self._request("POST", "/v1/adapters", json={"name": name, "path": str(path)})

    def replace_adapter(self, name: str, folder: str | Path) -> dict:
        """Hot-swap `name` to a new version from a local PEFT folder."""
        with contextlib.ExitStack() as stack:
            return self._request("PUT", _adapter_path(name), files=_open_adapter(folder, stack))

    def delete_adapter(self, name: str) -> dict:
        return self._request("DELETE", _adapter_path(name))

    # ---- operations ----
    def health(self) -> dict:
        return self._request("GET", "/health")

    def ready(self) -> dict:
        return self._request("GET", "/ready")
