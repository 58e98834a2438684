"""Chooses between each op's torch reference and its Triton twin, and checks kernel arguments.

Owns `use_triton`, `pick`, `KernelArgumentError` and the step memo (`step_memo`, `memoized`).
Imports nothing of ours.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache

import torch

KERNELS_ENV = "LORAPLEX_KERNELS"
"""`ref` forces the torch references everywhere; `triton` forces the Triton twins on any device
(on the CPU that needs TRITON_INTERPRET=1: tests of the engine's Triton path); anything else
lets CUDA use Triton."""

INDEX_DTYPES = (torch.int32, torch.int64)


class KernelArgumentError(ValueError):
    """A kernel got tensors of the wrong shape, dtype or device (a bug in the caller)."""


@lru_cache(maxsize=1)
def has_triton() -> bool:
    """True when the `triton` package can be imported (probed once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(device: torch.device | str) -> bool:
    """True on CUDA with triton importable, unless `LORAPLEX_KERNELS=ref`; `=triton`: anywhere."""
    choice = os.environ.get(KERNELS_ENV, "")
    if choice == "ref":
        return False
    return (choice == "triton" or torch.device(device).type == "cuda") and has_triton()


def triton_twin(ref: Callable) -> Callable | None:
    """`ref`'s `*_triton` twin: in `ref`'s own module, else in its `<module>_triton` sibling
    (imported here, lazily, so that CPU-only runs never import triton); None when neither has it.
    """
    name = ref.__name__.removesuffix("_ref") + "_triton"
    twin = getattr(sys.modules[ref.__module__], name, None)
    if twin is None:
        sibling = f"{ref.__module__}_triton"
        try:
            twin = getattr(importlib.import_module(sibling), name, None)
        except ModuleNotFoundError as error:
            if error.name != sibling:
                raise  # a broken twin module must not silently fall back to the reference
            return None
    return twin


def pick(ref: Callable, device: torch.device | str) -> Callable:
    """`ref`'s `*_triton` twin when `use_triton(device)` and it exists, else `ref`."""
    if use_triton(device):
        twin = triton_twin(ref)
        if twin is not None:
            return twin
    return ref


def check(condition: bool, message: str | Callable[[], str]) -> None:
    """Raise `KernelArgumentError(message)` unless `condition` (kept under `python -O`).

    A message that formats values comes as a lambda: the checks run for every layer of an
    eager step, and only a failing one should pay for the formatting."""
    if not condition:
        raise KernelArgumentError(message() if callable(message) else message)


def check_tensor(name: str, t: torch.Tensor, ndim: int,
                 dtypes: tuple[torch.dtype, ...] | torch.dtype | None = None) -> None:
    """`t` has `ndim` dimensions and one of `dtypes` (None: any)."""
    check(isinstance(t, torch.Tensor), lambda: f"{name}: expected a tensor, got {type(t).__name__}")
    check(t.dim() == ndim, lambda: f"{name}: expected {ndim}-D, got shape {tuple(t.shape)}")
    if isinstance(dtypes, torch.dtype):
        dtypes = (dtypes,)
    if dtypes is not None:
        check(t.dtype in dtypes, lambda: f"{name}: dtype {t.dtype} not in {dtypes}")


def check_same_device(**tensors: torch.Tensor) -> None:
    """All tensors live on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    check(len(set(devices.values())) <= 1, lambda: f"tensors on different devices: {devices}")


_STEP_MEMO: ContextVar[dict | None] = ContextVar("loraplex_step_memo", default=None)


@contextmanager
def step_memo() -> Iterator[None]:
    """Within it, launchers keep what they derive from a step's index tensors (block maps of
    segments and query blocks) for the next layer instead of deriving it again.

    One forward, one memo: the step's index tensors must not change inside it. A CUDA-graph
    capture is a forward of its own, so what it records is derived inside the graph.
    """
    token = _STEP_MEMO.set({})
    try:
        yield
    finally:
        _STEP_MEMO.reset(token)


def memoized(name: str, source: torch.Tensor, extra: tuple, derive: Callable[[], object]):
    """`derive()`, kept in the current step memo under (name, source, extra); without a memo,
    derived each time. The memo holds `source` itself, so a new tensor never matches."""
    memo = _STEP_MEMO.get()
    if memo is None:
        return derive()
    key = (name, id(source), extra)
    hit = memo.get(key)
    if hit is None or hit[0] is not source:
        hit = memo[key] = (source, derive())
    return hit[1]
