"""API keys → `Tenant`; per-tenant concurrency limits; who may use or change an adapter.

Plain Python (stdlib only): no FastAPI, no scheduler or model imports. Keys are kept only as
sha256 digests and never appear in an error message or a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from loraplex.server.store import NAME_RE

logger = logging.getLogger(__name__)

OPEN_TENANT = "default"
"""The one tenant of a server started without a key file."""
_Fail = Callable[[str | None, str], "ApiKeysError"]
_TENANT_FIELDS = frozenset(
    {"keys", "key_sha256", "admin", "max_concurrent_requests", "max_adapters", "weight",
     "ttft_deadline_s"})


class ApiKeysError(ValueError):
    """The key file is missing, not JSON, or invalid; the message names file, tenant, field."""


class AuthError(Exception):
    """No key, a malformed `Authorization` header or an unknown key (→ 401)."""


class LimitExceededError(Exception):
    """A tenant is over one of its limits (→ 429)."""


@dataclass(frozen=True, slots=True)
class Tenant:
    """Who sent a request, with the limits the server enforces for it."""

    name: str
    """Unique; also the owner folder of its adapters in the store."""
    is_admin: bool = False
    """May see, use, change and share every tenant's adapters."""
    max_concurrent_requests: int | None = None
    """Requests in flight at once; None: unlimited."""
    max_adapters: int | None = None
    """Adapters it may store; None: unlimited."""
    weight: float = 1.0
    """Share of the engine for fair scheduling, relative to other tenants."""
    ttft_deadline_s: float | None = None
    """Default time-to-first-token objective of its requests; a queued request that can no
    longer make it is aborted early (503). None: no deadline."""

    def __post_init__(self) -> None:
        if NAME_RE.fullmatch(self.name) is None:
            raise ValueError(f"Tenant.name: invalid name {self.name!r}")
        for field in ("max_concurrent_requests", "max_adapters"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ValueError(f"Tenant.{field} must be positive, got {value}")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"Tenant.weight must be positive, got {self.weight}")


def can_use(tenant: Tenant, owner: str, shared: bool) -> bool:
    """May `tenant` see and run an adapter of `owner`? If not, the server says 404."""
    return tenant.is_admin or shared or tenant.name == owner


def can_modify(tenant: Tenant, owner: str) -> bool:
    """May `tenant` replace or delete an adapter of `owner`?"""
    return tenant.is_admin or tenant.name == owner


def check_adapter_limit(tenant: Tenant, num_adapters: int) -> None:
    """Raise `LimitExceededError` if a tenant owning `num_adapters` may not store another."""
    if tenant.max_adapters is not None and num_adapters >= tenant.max_adapters:
        raise LimitExceededError(
            f"tenant {tenant.name!r} already stores {num_adapters} adapters "
            f"(limit {tenant.max_adapters})")


def key_digest(key: str) -> bytes:
    """sha256 of a key as the key file's `key_sha256` stores it (hex of this digest)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    """Key digests → tenants; built by `load(path)` or `open()`."""

    def __init__(self, digests: list[tuple[bytes, Tenant]], tenants: list[Tenant], *,
                 is_open: bool = False) -> None:
        self._digests = tuple(digests)
        self._tenants = MappingProxyType({t.name: t for t in tenants})
        self.is_open = is_open

    @classmethod
    def open(cls) -> ApiKeys:
        """No key file: every request is the admin tenant `default`."""
        return cls([], [Tenant(OPEN_TENANT, is_admin=True)], is_open=True)

    @classmethod
    def load(cls, path: str | Path) -> ApiKeys:
        """Read and fully validate a key file; `ApiKeysError` on any problem."""
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
            data = json.loads(text, object_pairs_hook=_no_duplicate_names)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ApiKeysError(f"{source}: cannot read API key file: {exc}") from exc
        keys = cls.from_json(data, source)
        if '"keys"' in text and Path(path).stat().st_mode & 0o077:
            logger.warning("%s holds clear API keys and is readable by others (chmod 600)",
                           source)
        return keys

    @classmethod
    def from_json(cls, data: object, source: str = "<api keys>") -> ApiKeys:
        """Build from the parsed key file; `source` names it in error messages."""
        if not isinstance(data, dict) or set(data) != {"tenants"}:
            raise ApiKeysError(f'{source}: expected an object with one field "tenants"')
        if not isinstance(data["tenants"], dict) or not data["tenants"]:
            raise ApiKeysError(f'{source}: field "tenants" must be a non-empty object')
        owners: dict[bytes, str] = {}
        tenants = []
        for name, entry in data["tenants"].items():
            tenant, digests = _parse_tenant(source, name, entry)
            for index, digest in enumerate(digests):
                if digest in owners:
                    raise ApiKeysError(
                        f"{source}: tenant {name!r}: key #{index + 1} is also a key of "
                        f"tenant {owners[digest]!r}")
                owners[digest] = name
            tenants.append(tenant)
        by_name = {t.name: t for t in tenants}
        return cls([(d, by_name[n]) for d, n in owners.items()], tenants)

    @property
    def tenants(self) -> Mapping[str, Tenant]:
        """Tenant name → `Tenant` (read-only)."""
        return self._tenants

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of a raw `Authorization` header value (`Bearer <key>`), or `AuthError`."""
        if self.is_open:
            return self._tenants[OPEN_TENANT]
        if not authorization or not authorization.strip():
            raise AuthError("missing API key: send the header 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthError("malformed Authorization header: expected 'Bearer <key>'")
        digest = key_digest(key)
        found = None
        for known, tenant in self._digests:  # no early exit: time does not depend on the key
            if hmac.compare_digest(known, digest):
                found = tenant
        if found is None:
            raise AuthError("invalid API key")
        return found


class ConcurrencyLimiter:
    """Thread-safe count of each tenant's requests in flight, capped by its limit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}

    def acquire(self, tenant: Tenant) -> None:
        """Count one more request of `tenant`, or raise `LimitExceededError` at its limit."""
        with self._lock:
            count = self._in_flight.get(tenant.name, 0)
            limit = tenant.max_concurrent_requests
            if limit is not None and count >= limit:
                raise LimitExceededError(
                    f"tenant {tenant.name!r} has {count} requests running (limit {limit})")
            self._in_flight[tenant.name] = count + 1

    def release(self, tenant: Tenant) -> None:
        """Count one request of `tenant` less; each `acquire` is released exactly once."""
        with self._lock:
            count = self._in_flight.get(tenant.name, 0)
            if count < 1:
                raise ValueError(f"release without acquire for tenant {tenant.name!r}")
            if count == 1:
                del self._in_flight[tenant.name]
            else:
                self._in_flight[tenant.name] = count - 1

    @contextmanager
    def hold(self, tenant: Tenant) -> Iterator[None]:
        """`with limiter.hold(tenant):` acquire on entry, release on exit (even on error)."""
        self.acquire(tenant)
        try:
            yield
        finally:
            self.release(tenant)

    def in_flight(self, tenant_name: str) -> int:
        """Requests of that tenant now counted."""
        with self._lock:
            return self._in_flight.get(tenant_name, 0)


def _no_duplicate_names(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for name, value in pairs:
        if name in result:
            raise ValueError(f"duplicate field {name!r}")
        result[name] = value
    return result


def _parse_tenant(source: str, name: object, entry: object) -> tuple[Tenant, list[bytes]]:
    """One `tenants` entry → its `Tenant` and key digests; `ApiKeysError` names the field."""
    def fail(field: str | None, problem: str) -> ApiKeysError:
        where = f"{source}: tenant {name!r}" + (f": field {field!r}" if field else "")
        return ApiKeysError(f"{where}: {problem}")

    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise fail(None, "invalid tenant name: expected 1-64 characters from [A-Za-z0-9._-], "
                         "starting with a letter or digit")
    if not isinstance(entry, dict):
        raise fail(None, "expected an object")
    unknown = sorted(set(entry) - _TENANT_FIELDS)
    if unknown:
        raise fail(unknown[0], f"unknown field (known: {sorted(_TENANT_FIELDS)})")
    digests = _parse_keys(entry, fail)
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise fail("admin", "expected true or false")
    limits = {f: _positive_int(entry.get(f), f, fail)
              for f in ("max_concurrent_requests", "max_adapters")}
    weight = entry.get("weight", 1.0)
    if (isinstance(weight, bool) or not isinstance(weight, int | float)
            or not math.isfinite(weight) or weight <= 0):
        raise fail("weight", "expected a positive number")
    deadline = entry.get("ttft_deadline_s")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(
            deadline, int | float) or not math.isfinite(deadline) or deadline <= 0):
        raise fail("ttft_deadline_s", "expected a positive number of seconds")
    return Tenant(name, is_admin=admin, weight=float(weight),
                  ttft_deadline_s=None if deadline is None else float(deadline),
                  **limits), digests


def _parse_keys(entry: dict[str, object], fail: _Fail) -> list[bytes]:
    digests = []
    for field in ("keys", "key_sha256"):
        values = entry.get(field, [])
        if not isinstance(values, list):
            raise fail(field, "expected a list of strings")
        for index, value in enumerate(values):
            if not isinstance(value, str) or not value or not value.isprintable() or any(
                    c.isspace() for c in value):
                raise fail(field, f"entry #{index + 1} must be a non-empty string "
                                  "without spaces or control characters")
            if field == "keys":
                digests.append(key_digest(value))
            elif len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value):
                digests.append(bytes.fromhex(value))
            else:
                raise fail(field, f"entry #{index + 1} must be 64 hexadecimal digits (sha256)")
    if not digests:
        raise fail("keys", 'a tenant needs at least one key in "keys" or "key_sha256"')
    return digests


def _positive_int(value: object, field: str, fail: _Fail) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(field, "expected a positive integer or null")
    return value
