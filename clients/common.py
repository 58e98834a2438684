"""What both HTTP clients share: defaults, the `LoraplexError` family (OpenAI error bodies →
`LoraplexAPIError`), the SSE parser, `text_of`, request-body and multipart helpers, and `_Base`
(settings and the base model's name). Speaks only HTTP: imports nothing of the server or the
engine."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 600.0
ADAPTER_FILES = {"adapter_config": "adapter_config.json",
                 "adapter_model": "adapter_model.safetensors"}
"""Multipart field → the PEFT file it carries."""
_CONTENT_TYPES = {"adapter_config": "application/json",
                  "adapter_model": "application/octet-stream"}


class LoraplexError(Exception):
    """Base of every error this client raises."""


class LoraplexConnectionError(LoraplexError):
    """The server could not be reached, or a stream ended before `[DONE]`."""


class AdapterFolderError(LoraplexError):
    """A local adapter folder lacks one of the two PEFT files."""


class LoraplexAPIError(LoraplexError):
    """The server answered an error: OpenAI's `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, type: str, message: str, param: str | None = None,
                 code: str | int | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message = status, type, message
        self.param, self.code = param, code

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status}, {self.type})"

    @classmethod
    def from_response(cls, status: int, content: bytes) -> LoraplexAPIError:
        """Built from an error body; a body not in OpenAI's shape becomes the message."""
        try:
            error = json.loads(content)["error"]
            if isinstance(error, str):
                error = {"message": error}
            if not isinstance(error, dict):
                raise TypeError(error)
        except (ValueError, KeyError, TypeError):
            text = content.decode("utf-8", "replace").strip()
            return cls(status, "http_error", text or f"HTTP {status}")
        return cls(status, str(error.get("type") or "http_error"),
                   str(error.get("message") or f"HTTP {status}"), error.get("param"),
                   error.get("code"))


# ---- pieces shared by both clients -----------------------------------------------------------
class SSEParser:
    """Server-sent events, line by line → JSON payloads; `done` once `data: [DONE]` arrives.

    Follows the SSE spec: `:` lines are comments, blank lines end an event, several `data:`
    lines of one event join with newlines; an `error` event or payload raises LoraplexAPIError.
    """

    def __init__(self) -> None:
        self.done = False
        self._data: list[str] = []
        self._event = ""

    def feed(self, line: str) -> dict | None:
        """One line (without its newline); the event's payload when the line completes one."""
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        return None  # id, retry and unknown fields do not matter here

    def close(self) -> dict | None:
        """End of the byte stream: flush an event that lacked its blank line."""
        return self._dispatch()

    def _dispatch(self) -> dict | None:
        data, event = "\n".join(self._data), self._event
        self._data, self._event = [], ""
        if not data or self.done:
            return None
        if data.strip() == "[DONE]":
            self.done = True
            return None
        try:
            payload = json.loads(data)
        except ValueError:
            raise LoraplexAPIError(502, "stream_error",
                                   f"stream sent a non-JSON event: {data[:200]!r}") from None
        if event == "error" or (isinstance(payload, dict) and "error" in payload):
            error = payload.get("error", payload) if isinstance(payload, dict) else payload
            if not isinstance(error, dict):
                error = {"message": str(error)}
            code = error.get("code")
            status = code if isinstance(code, int) and 400 <= code < 600 else 500
            raise LoraplexAPIError(status, str(error.get("type") or "stream_error"),
                                   str(error.get("message") or "error in stream"),
                                   error.get("param"), code)
        return payload


def text_of(response: Mapping[str, Any], index: int = 0) -> str:
    """The text of choice `index` of a completion, chat completion or either's stream chunk."""
    for choice in response.get("choices") or []:
        if choice.get("index", 0) != index:
            continue
        if "text" in choice:
            return choice["text"] or ""
        part = choice.get("message") or choice.get("delta") or {}
        return part.get("content") or ""
    return ""


def _body(key: str, value: object, model: str, params: Mapping[str, Any],
          stream: bool) -> dict:
    """A completions/chat body: None-valued params dropped (the server's defaults apply)."""
    body = {"model": model, key: value, **{k: v for k, v in params.items() if v is not None}}
    if stream:
        body["stream"] = True
    return body


def _adapter_path(name: str) -> str:
    return "/v1/adapters/" + quote(name, safe="")


def _open_adapter(folder: str | Path, stack: contextlib.ExitStack
                  ) -> dict[str, tuple[str, BinaryIO, str]]:
    """The multipart `files` of a PEFT folder (file handles owned by `stack`)."""
    folder = Path(folder)
    missing = [f for f in ADAPTER_FILES.values() if not (folder / f).is_file()]
    if missing:
        raise AdapterFolderError(f"adapter folder {folder} lacks {', '.join(missing)}")
    try:
        return {field: (filename, stack.enter_context((folder / filename).open("rb")),
                        _CONTENT_TYPES[field]) for field, filename in ADAPTER_FILES.items()}
    except OSError as exc:
        raise AdapterFolderError(f"cannot read adapter folder {folder}: {exc}") from exc


def _check(response: httpx.Response) -> httpx.Response:
    if response.is_error:
        raise LoraplexAPIError.from_response(response.status_code, response.content)
    return response


def _json(response: httpx.Response) -> Any:
    _check(response)
    try:
        return response.json()
    except ValueError:
        raise LoraplexAPIError(response.status_code, "decode_error",
                               "server sent a body that is not JSON") from None


def _connection_error(base_url: str, exc: httpx.TransportError) -> LoraplexConnectionError:
    return LoraplexConnectionError(f"cannot talk to {base_url}: {exc or type(exc).__name__}")


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"user-agent": "loraplex-client", "accept": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


class _Base:
    """Settings common to both clients; the base model's name, fetched once."""

    def __init__(self, base_url: str, api_key: str | None,
                 timeout: float | httpx.Timeout) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else \
            httpx.Timeout(timeout, connect=min(10.0, timeout))
        self._base_model: str | None = None

    @staticmethod
    def _first_model(listing: dict) -> str:
        data = listing.get("data") or []
        if not data:
            raise LoraplexAPIError(502, "invalid_response", "server lists no model")
        return str(data[0]["id"])
