"""What the Triton-twin test modules share (not a test module itself).

`test_triton_kernels.py` (LoRA, DoRA, SHiRA) and `test_triton_attention.py` (paged attention,
K/V write) test every Triton twin against its torch reference. With CUDA they run in the pytest
process, at small and at Llama-3-8B shapes, in fp32, fp16 and bf16. Without it they run under
Triton's interpreter at small shapes in fp32 and fp16 (it does no bf16), in a child pytest
started with TRITON_INTERPRET=1: the interpreter must be on before `triton` is first imported,
and torch imports it early (torch._dynamo, via transformers), so setting it in this process
would come too late and would leak into other modules. Hence each test module imports its
Triton kernels only when `RUN_HERE`, defines a driver `test_interpreter_suite_in_child_process`
that calls `run_in_interpreter_child(__file__)`, and ends with `drop_tests_not_run_here(globals())`.

This module imports no Triton. It holds the grid (`DTYPES`, `REL_TOL`, `Shape`), seeded
generators, the tolerance check, the adapter kernels' inputs (token slots, x, poisoned (NaN)
outputs), the tf32 fixture (import `exact_fp32_references` into a test module to switch it on
there) and the driver pattern.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
INTERPRET = "TRITON_INTERPRET"
RUN_HERE = ON_CUDA or os.environ.get(INTERPRET) == "1"
DRIVER = "test_interpreter_suite_in_child_process"

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])
REL_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def exact_fp32_references(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """fp32 references on CUDA without tf32 (the 1e-4 contract)."""
    if ON_CUDA:
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    yield


@dataclass(frozen=True)
class Shape:
    """One size of the LoRA grid: d_in, the d_out of each slice, tokens, slots and their ranks."""

    name: str
    d_in: int
    d_outs: tuple[int, ...]
    num_tokens: int
    ranks: tuple[int, ...]


SMALL = Shape("small", 48, (40, 16, 24), 12, (1, 7, 8, 16, 128, 8, 1, 16))
REAL = Shape("llama3_8b", 4096, (4096, 1024, 1024), 64,
             tuple([8, 16, 32, 64] * 8 + [1, 7, 128, 16]))
SHAPES = [SMALL] + ([REAL] if ON_CUDA else [])


def gen_for(*key: object) -> torch.Generator:
    """A generator seeded from the test's parameters (stable across processes)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ over the finite entries of want; inf when NaNs disagree."""
    got, want = got.double().cpu(), want.double().cpu()
    if not torch.equal(torch.isnan(got), torch.isnan(want)):
        return float("inf")
    finite = ~torch.isnan(want)
    diff = (got[finite] - want[finite]).norm()
    return float(diff / want[finite].norm().clamp(min=1e-30))


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    err = rel_err(got, want)
    assert err <= REL_TOL[dtype], f"relative error {err:.3g} > {REL_TOL[dtype]} ({dtype})"


def make_token_slots(num_tokens: int, num_slots: int, popularity: str,
                     gen: torch.Generator) -> torch.Tensor:
    """[T] slots: distinct / uniform / skewed (one hot adapter), about 30% without adapter."""
    if popularity == "distinct":
        slots = torch.arange(num_tokens) % num_slots
        slots = slots[torch.randperm(num_tokens, generator=gen)]
    elif popularity == "uniform":
        slots = torch.randint(0, num_slots, (num_tokens,), generator=gen)
    else:
        slots = torch.full((num_tokens,), 4)
        slots[torch.randperm(num_tokens, generator=gen)[:3]] = torch.tensor([0, 1, 3])
    slots[torch.rand(num_tokens, generator=gen) < 0.3] = -1
    return slots.long().to(DEVICE)


def poisoned_out(num_tokens: int, d_out: int, dtype: torch.dtype, token_slots: torch.Tensor,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(wide, out): out a column slice of `wide`; random, NaN on tokens without adapter and in
    the columns around the slice (which must stay untouched)."""
    wide = torch.full((num_tokens, d_out + 8), float("nan"), dtype=dtype)
    wide[:, 3:3 + d_out] = torch.randn(num_tokens, d_out, generator=gen).to(dtype)
    wide = wide.to(DEVICE)
    wide[token_slots < 0] = float("nan")
    return wide, wide[:, 3:3 + d_out]


def x_for(num_tokens: int, d_in: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(num_tokens, d_in, generator=gen).to(dtype).to(DEVICE)


# ---- the interpreter driver ---------------------------------------------------------------------

def run_in_interpreter_child(test_file: str) -> None:
    """Without CUDA: `test_file`'s tests under TRITON_INTERPRET=1 in a fresh interpreter."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, **{INTERPRET: "1"})
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(Path(test_file).resolve())],
        cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def drop_tests_not_run_here(namespace: dict) -> None:
    """Here only the driver runs (without CUDA and interpreter); in the child, or on CUDA, all
    tests but the driver run. Pytest collects what the module namespace holds after import, so
    call this at the end of the test module with its `globals()`."""
    for name in [n for n in namespace if n.startswith("test_")]:
        if RUN_HERE == (name == DRIVER):
            del namespace[name]
