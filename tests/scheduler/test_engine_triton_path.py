"""The engine on its Triton path without a GPU: a child pytest under Triton's interpreter.

`LORAPLEX_KERNELS=triton` sends every op to its Triton twin on the CPU and `TRITON_INTERPRET=1`
runs the kernels in numpy, so the engine's own wiring of the kernels (q|k|v and gate|up in one
launch, DoRA's g in the expand epilogue, per-sequence segments in prefill, SHiRA fused and
gathered, the padded static buffers of the CUDA-graph path) meets the same oracles as the
reference path: transformers + peft. The interpreter
must be on before `triton` is first imported, hence the child process. CUDA graphs need a GPU
(`loadtest/gpu_session.sh` runs all of these tests there).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SELECTION = [
    "tests/scheduler/test_engine_parity.py", "tests/scheduler/test_shira_fusion.py",
    "tests/scheduler/test_engine_batching.py::test_mixed_batch_equals_peft_generate",
    "tests/scheduler/test_step_graph_padding.py",
    "-k", "llama or (qwen3 and (dora or shira)) or fusion or mixed_batch or padded "
          "or modules_the_batch",
]
EXPECTED = 8 + 2 + 4 + 1 + 2  # llama × every case, qwen3 DoRA/SHiRA, fusion, mixed, graph path


def test_engine_parity_on_the_triton_path_under_the_interpreter() -> None:
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", LORAPLEX_KERNELS="triton")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SELECTION],
        cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert f"{EXPECTED} passed" in summary and "skipped" not in summary, summary
