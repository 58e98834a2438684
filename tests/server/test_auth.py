"""API key file validation, authentication, per-tenant concurrency limits, visibility rules."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest

from loraplex.server.auth import (
    ApiKeys,
    ApiKeysError,
    AuthError,
    ConcurrencyLimiter,
    LimitExceededError,
    Tenant,
    can_modify,
    can_use,
    check_adapter_limit,
)

SECRET = "sk-acme-very-secret-1234"
ADMIN_SECRET = "sk-admin-5678"
HASHED_SECRET = "sk-hashed-only-9999"
GOOD = {"tenants": {
    "acme": {"keys": [SECRET, "sk-acme-second"], "admin": False, "max_concurrent_requests": 16,
             "max_adapters": 100, "weight": 2.0},
    "ops": {"keys": [ADMIN_SECRET], "admin": True},
    "beta.team-2": {"key_sha256": [hashlib.sha256(HASHED_SECRET.encode()).hexdigest().upper()],
                    "weight": 3},
}}


def write_keys(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_load_good_file(tmp_path: Path) -> None:
    keys = ApiKeys.load(write_keys(tmp_path, GOOD))
    assert not keys.is_open
    assert keys.tenants["acme"] == Tenant("acme", is_admin=False, max_concurrent_requests=16,
                                          max_adapters=100, weight=2.0)
    assert keys.tenants["ops"] == Tenant("ops", is_admin=True)
    assert keys.tenants["beta.team-2"].weight == 3.0
    assert set(keys.tenants) == {"acme", "ops", "beta.team-2"}
    with pytest.raises(TypeError):
        keys.tenants["evil"] = Tenant("evil", is_admin=True)  # type: ignore[index]


def tenant(**fields: object) -> dict:
    return {"tenants": {"acme": {"keys": ["sk-1"], **fields}}}


BAD_FILES = [
    # (content, words the message must contain)
    ("not json", ["cannot read"]),
    ([], ['"tenants"']),
    ({"tenants": {}, "extra": 1}, ['"tenants"']),
    ({"tenants": {}}, ["non-empty"]),
    ({"tenants": []}, ["non-empty"]),
    ({"tenants": {"acme": []}}, ["'acme'", "object"]),
    (tenant(colour="red"), ["'acme'", "'colour'", "unknown"]),
    (tenant(admin="yes"), ["'acme'", "'admin'"]),
    (tenant(admin=1), ["'acme'", "'admin'"]),
    (tenant(max_concurrent_requests=0), ["'acme'", "'max_concurrent_requests'"]),
    (tenant(max_concurrent_requests=-3), ["'max_concurrent_requests'"]),
    (tenant(max_concurrent_requests=2.5), ["'max_concurrent_requests'"]),
    (tenant(max_concurrent_requests=True), ["'max_concurrent_requests'"]),
    (tenant(max_adapters=0), ["'acme'", "'max_adapters'"]),
    (tenant(max_adapters="10"), ["'max_adapters'"]),
    (tenant(weight=0), ["'acme'", "'weight'"]),
    (tenant(weight=-1.5), ["'weight'"]),
    (tenant(weight="2"), ["'weight'"]),
    (tenant(weight=False), ["'weight'"]),
    ({"tenants": {"acme": {"admin": True}}}, ["'acme'", "'keys'", "at least one key"]),
    ({"tenants": {"acme": {"keys": []}}}, ["'acme'", "at least one key"]),
    ({"tenants": {"acme": {"keys": "sk-1"}}}, ["'acme'", "'keys'", "list"]),
    ({"tenants": {"acme": {"keys": [""]}}}, ["'acme'", "'keys'", "non-empty"]),
    ({"tenants": {"acme": {"keys": [7]}}}, ["'acme'", "'keys'"]),
    ({"tenants": {"acme": {"keys": ["sk 1"]}}}, ["'keys'"]),
    ({"tenants": {"acme": {"keys": ["sk-1\n"]}}}, ["'keys'"]),
    ({"tenants": {"acme": {"key_sha256": ["abc"]}}}, ["'acme'", "'key_sha256'", "64"]),
    ({"tenants": {"acme": {"key_sha256": ["g" * 64]}}}, ["'key_sha256'"]),
    ({"tenants": {"acme": {"keys": ["sk-1"]}, "beta": {"keys": ["sk-1"]}}},
     ["'beta'", "'acme'", "also a key"]),
    ({"tenants": {"acme": {"keys": ["sk-1", "sk-1"]}}}, ["'acme'", "also a key"]),
    ({"tenants": {"acme": {"keys": ["sk-1"]},
                  "beta": {"key_sha256": [hashlib.sha256(b"sk-1").hexdigest()]}}},
     ["'beta'", "'acme'"]),
    ({"tenants": {"../etc": {"keys": ["sk-1"]}}}, ["'../etc'", "invalid tenant name"]),
    ({"tenants": {".hidden": {"keys": ["sk-1"]}}}, ["invalid tenant name"]),
    ({"tenants": {"": {"keys": ["sk-1"]}}}, ["invalid tenant name"]),
    ({"tenants": {"a" * 65: {"keys": ["sk-1"]}}}, ["invalid tenant name"]),
    ({"tenants": {"acme\n": {"keys": ["sk-1"]}}}, ["invalid tenant name"]),
    ('{"tenants": {"acme": {"keys": ["a"]}, "acme": {"keys": ["b"]}}}', ["duplicate", "acme"]),
]


@pytest.mark.parametrize(("content", "words"), BAD_FILES)
def test_bad_key_files(tmp_path: Path, content: object, words: list[str]) -> None:
    path = write_keys(tmp_path, content)
    with pytest.raises(ApiKeysError) as info:
        ApiKeys.load(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, (word, message)
    assert "sk-1" not in message, "a key leaked into an error message"


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(ApiKeysError, match=r"nope\.json"):
        ApiKeys.load(tmp_path / "nope.json")


def test_warns_about_readable_clear_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_keys(tmp_path, GOOD)
    path.chmod(0o644)
    ApiKeys.load(path)
    assert "chmod 600" in caplog.text and SECRET not in caplog.text
    caplog.clear()
    path.chmod(0o600)
    ApiKeys.load(path)
    assert "chmod 600" not in caplog.text


def test_authenticate(tmp_path: Path) -> None:
    keys = ApiKeys.load(write_keys(tmp_path, GOOD))
    assert keys.authenticate(f"Bearer {SECRET}").name == "acme"
    assert keys.authenticate("Bearer sk-acme-second").name == "acme"
    assert keys.authenticate(f"bearer   {ADMIN_SECRET} ").is_admin
    assert keys.authenticate(f"Bearer {HASHED_SECRET}").name == "beta.team-2"


@pytest.mark.parametrize("header", [
    None, "", "   ", "Bearer", "Bearer ", f"Basic {SECRET}", SECRET, f"Bearer {SECRET}x",
    f"Bearer {SECRET[:-1]}", f"Bearer {SECRET.upper()}", "Bearer sk-unknown",
    f"Bearer {hashlib.sha256(HASHED_SECRET.encode()).hexdigest()}",  # the digest is no key
])
def test_authenticate_refuses(tmp_path: Path, header: str | None) -> None:
    keys = ApiKeys.load(write_keys(tmp_path, GOOD))
    with pytest.raises(AuthError) as info:
        keys.authenticate(header)
    message = str(info.value)
    for secret in (SECRET, SECRET[:-1], HASHED_SECRET, "sk-unknown"):
        assert secret not in message and secret.upper() not in message


def test_open_mode() -> None:
    keys = ApiKeys.open()
    assert keys.is_open
    assert list(keys.tenants) == ["default"]
    for header in (None, "", "Bearer whatever", "garbage"):
        tenant = keys.authenticate(header)
        assert tenant.name == "default" and tenant.is_admin


def test_tenant_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="name"):
        Tenant("a/b")
    with pytest.raises(ValueError, match="max_concurrent_requests"):
        Tenant("a", max_concurrent_requests=0)
    with pytest.raises(ValueError, match="weight"):
        Tenant("a", weight=float("nan"))


def test_visibility_rules() -> None:
    acme, beta, admin = Tenant("acme"), Tenant("beta"), Tenant("ops", is_admin=True)
    assert can_use(acme, "acme", shared=False)
    assert not can_use(beta, "acme", shared=False)
    assert can_use(beta, "acme", shared=True)
    assert can_use(admin, "acme", shared=False)
    assert can_modify(acme, "acme")
    assert not can_modify(beta, "acme")
    assert can_modify(admin, "acme")


def test_adapter_limit() -> None:
    check_adapter_limit(Tenant("a"), 10_000)
    capped = Tenant("a", max_adapters=2)
    check_adapter_limit(capped, 1)
    with pytest.raises(LimitExceededError, match="2"):
        check_adapter_limit(capped, 2)


def test_limiter_counts_and_refuses() -> None:
    limiter = ConcurrencyLimiter()
    acme, free = Tenant("acme", max_concurrent_requests=2), Tenant("free")
    limiter.acquire(acme)
    with limiter.hold(acme):
        assert limiter.in_flight("acme") == 2
        with pytest.raises(LimitExceededError, match="acme"):
            limiter.acquire(acme)
        for _ in range(100):
            limiter.acquire(free)  # other tenants are not affected, None is unlimited
    assert limiter.in_flight("acme") == 1
    with pytest.raises(RuntimeError), limiter.hold(acme):
        raise RuntimeError("request failed")
    assert limiter.in_flight("acme") == 1, "hold releases on error"
    limiter.release(acme)
    assert limiter.in_flight("acme") == 0 and limiter.in_flight("free") == 100
    with pytest.raises(ValueError, match="release without acquire"):
        limiter.release(acme)


def test_limiter_under_threads() -> None:
    limit, num_threads, tries = 3, 16, 200
    limiter = ConcurrencyLimiter()
    acme = Tenant("acme", max_concurrent_requests=limit)
    lock, peak, refused, admitted = threading.Lock(), [0], [0], [0]
    start = threading.Barrier(num_threads)

    def worker() -> None:
        start.wait()
        for _ in range(tries):
            try:
                with limiter.hold(acme):
                    now = limiter.in_flight("acme")
                    with lock:
                        peak[0] = max(peak[0], now)
                        admitted[0] += 1
                    time.sleep(0.0001)
            except LimitExceededError:
                with lock:
                    refused[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert limiter.in_flight("acme") == 0
    assert admitted[0] + refused[0] == num_threads * tries
    assert peak[0] <= limit
    assert refused[0] > 0 and admitted[0] > 0, "the test must exercise both paths"
