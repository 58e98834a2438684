"""The GPU path's launch discipline, checked without a GPU (`loadtest/launch_count.py`): the
forward on the Triton path reads no device value on the host (a CUDA graph could not capture
it), launches LoRA only for runs of targeted projections, and builds a step's index maps once.
"""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("triton")

from loraplex.loadtest import launch_count  # noqa: E402

ARGS = argparse.Namespace(batch=8, context=64, all_modules=False, shape="tiny")


def count(layers: int, setting: str, step: str) -> dict:
    return launch_count.run_child(layers, setting, step, ARGS)


@pytest.mark.parametrize("step", ["decode", "mixed"])
def test_no_host_reads_and_lora_launches_per_run_of_targeted_projections(step: str) -> None:
    shrink = "_shrink_kernel" if step == "decode" else "_shrink_segments_kernel"
    expand = "_expand_kernel" if step == "decode" else "_expand_segments_kernel"
    # Runs of consecutive targeted modules: (a) q|k|v, o; (b) q|k|v, o, gate|up, down.
    for setting, runs in (("base", 0), ("a_rank16_qkvo", 2), ("b_mixed_all7", 4)):
        counts = count(2, setting, step)
        assert counts["host_reads"] == 0, (setting, counts)
        assert counts["triton"].get(shrink, 0) == counts["triton"].get(expand, 0) == 2 * runs
        assert counts["triton"]["_attention_kernel"] == 2  # one per layer


def test_segment_maps_are_built_once_per_step() -> None:
    one, two = count(1, "b_mixed_all7", "mixed"), count(2, "b_mixed_all7", "mixed")
    for op in ("searchsorted", "cumsum"):  # the block map's ops: not again for layer 2
        assert one["torch_ops"].get(op, 0) == two["torch_ops"].get(op, 0) > 0, op
