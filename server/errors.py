"""Every exception class → (HTTP status, OpenAI error `type`), and the one error body shape.

Imports the exception classes of the layers below; raises nothing itself but `ServerError`s.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from loraplex.model.adapters.errors import AdapterError
from loraplex.model.sampler import SamplingParamsError
from loraplex.scheduler.errors import DeadlineExceededError, RequestError, UnknownAdapterError
from loraplex.server.auth import ApiKeysError, AuthError, LimitExceededError
from loraplex.server.store import (
    AdapterExistsError,
    NoSuchAdapterError,
    StoreError,
    UploadTooLargeError,
)


class ServerError(Exception):
    """An error the server raises itself, carrying its status."""

    status = 500
    type = "internal_server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class BadRequestError(ServerError):
    status, type = 400, "invalid_request_error"


class NotFoundError(ServerError):
    status, type = 404, "not_found_error"


class ConflictError(ServerError):
    status, type = 409, "conflict_error"


class UnavailableError(ServerError):
    status, type = 503, "service_unavailable_error"


# Order matters: the first matching class wins (subclasses before their bases).
_MAP: list[tuple[type[BaseException], int, str]] = [
    (DeadlineExceededError, 503, "service_unavailable_error"),
    (UnknownAdapterError, 404, "not_found_error"),
    (UploadTooLargeError, 413, "invalid_request_error"),
    (NoSuchAdapterError, 404, "not_found_error"),
    (AdapterExistsError, 409, "conflict_error"),
    (AuthError, 401, "authentication_error"),
    (LimitExceededError, 429, "rate_limit_error"),
    (AdapterError, 400, "invalid_request_error"),
    (RequestError, 400, "invalid_request_error"),
    (SamplingParamsError, 400, "invalid_request_error"),
    (StoreError, 400, "invalid_request_error"),
    (ApiKeysError, 500, "internal_server_error"),
]


KNOWN_ERRORS: tuple[type[BaseException], ...] = (ServerError, *(cls for cls, _, _ in _MAP))


def classify(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, ServerError):
        return exc.status, exc.type
    for cls, status, kind in _MAP:
        if isinstance(exc, cls):
            return status, kind
    return 500, "internal_server_error"


def error_body(message: str, kind: str, param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(exc: BaseException, request_id: str | None = None) -> JSONResponse:
    status, kind = classify(exc)
    if status == 500 and not isinstance(exc, ServerError):
        message = f"internal error (request id {request_id}); see the server log"
    else:
        message = str(exc)
    param = getattr(exc, "param", None)
    code = getattr(exc, "code", None) or (status if status >= 500 else None)
    headers = {"x-request-id": request_id} if request_id else None
    return JSONResponse(error_body(message, kind, param, code), status_code=status,
                        headers=headers)
