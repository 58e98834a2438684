"""Errors a request can meet in the engine; `server/errors.py` maps each to a status."""

from __future__ import annotations


class RequestError(ValueError):
    """A request that can never be served as given (400)."""


class RequestTooLongError(RequestError):
    """Prompt + max_tokens exceed the model's context or the whole pool."""


class DeadlineExceededError(RequestError):
    """A waiting request that can no longer get its first token by its deadline (aborted early,
    finish reason `deadline`)."""


class UnknownAdapterError(LookupError):
    """The request names no registered adapter (404)."""


class AdapterNameError(ValueError):
    """An adapter name that is empty, malformed or taken by the base model."""
