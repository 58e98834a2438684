"""Python clients (sync, async, streaming, adapter admin) and the `loraplex` CLI's client
commands; they speak only HTTP to a loraplex server."""

from loraplex.clients.client import (
    AdapterFolderError,
    AsyncLoraplexClient,
    LoraplexAPIError,
    LoraplexClient,
    LoraplexConnectionError,
    LoraplexError,
    SSEParser,
    text_of,
)

__all__ = [
    "AdapterFolderError",
    "AsyncLoraplexClient",
    "LoraplexAPIError",
    "LoraplexClient",
    "LoraplexConnectionError",
    "LoraplexError",
    "SSEParser",
    "text_of",
]
