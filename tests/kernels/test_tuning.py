"""Tuning tables (`kernels.tuning`): what a table may hold, which one is in force, and that the
decode kernels still compute their references under a table far from the defaults.

The table checks (`TestTables`, a class, so that `drop_tests_not_run_here` keeps it) run in
this process; the kernels' check follows `triton_helpers.py` (on CUDA here, else under Triton's
interpreter in a child pytest).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from loraplex.kernels import tuning  # noqa: E402
from loraplex.kernels.dispatch import KERNELS_ENV  # noqa: E402
from loraplex.kernels.attention import paged_attention_ref  # noqa: E402
from loraplex.kernels.lora import lora_expand_ref, lora_shrink_ref  # noqa: E402
from loraplex.loadtest.bench_sweep import programs_per_sm, tuned_table  # noqa: E402
from tests.conftest import make_engine  # noqa: E402
from tests.kernels.test_triton_attention import AttentionCase, make_kv  # noqa: E402
from tests.kernels.test_triton_kernels import make_lora_pool  # noqa: E402
from tests.kernels.triton_helpers import (  # noqa: E402
    DEVICE,
    DTYPES,
    RUN_HERE,
    Shape,
    assert_close,
    drop_tests_not_run_here,
    exact_fp32_references,  # noqa: F401 (autouse fixture: no tf32 in fp32 references)
    gen_for,
    make_token_slots,
    poisoned_out,
    run_in_interpreter_child,
    x_for,
)

if RUN_HERE:
    from loraplex.kernels import attention_triton as attn_t  # noqa: E402
    from loraplex.kernels import lora_triton as lora_t  # noqa: E402

# Far from every default: small blocks, 2 warps, and grid targets that force splits.
ODD_TABLE = dict(shrink_block_k=32, shrink_warps=2, shrink_programs_per_sm=64,
                 expand_block_n=16, expand_block_r=32, expand_warps=2,
                 attention_block_n=16, attention_warps=2, attention_programs_per_sm=64)


@pytest.fixture
def table_in_force(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Puts a table (a dict) in force through LORAPLEX_KERNEL_TUNING; the defaults after."""
    def put(data: dict) -> Path:
        path = tmp_path / "table.json"
        path.write_text(json.dumps(data))
        monkeypatch.setenv(tuning.ENV, str(path))
        tuning.launch.cache_clear()
        return path
    yield put
    monkeypatch.delenv(tuning.ENV, raising=False)
    tuning.launch.cache_clear()


class TestTables:
    def test_a_table_sets_its_fields_over_the_defaults(self, table_in_force) -> None:
        table_in_force(dict(device="test GPU", source="a test", expand_block_n=32))
        got = tuning.launch(torch.device("cpu"))
        assert got == dataclasses.replace(tuning.Launch(), expand_block_n=32)
        assert got.changed() == {"expand_block_n": 32}

    def test_without_a_table_the_defaults(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv(tuning.ENV, raising=False)
        tuning.launch.cache_clear()
        assert tuning.launch(torch.device("cpu")) == tuning.Launch()

    @pytest.mark.parametrize("data,needle", [
        (dict(shrink_block=64), "unknown fields ['shrink_block']"),
        (dict(expand_block_n=96), "expand_block_n = 96"),
        (dict(expand_block_n=2048), "expand_block_n = 2048"),
        (dict(shrink_warps=True), "shrink_warps = True"),
        (dict(attention_warps="4"), "attention_warps = '4'"),
        (dict(attention_programs_per_sm=0), "attention_programs_per_sm = 0"),
        ([1, 2], "a JSON object"),
    ])
    def test_a_bad_table_is_refused_with_its_path(self, table_in_force, data,
                                                  needle: str) -> None:
        path = table_in_force(data)
        with pytest.raises(ValueError) as error:
            tuning.launch(torch.device("cpu"))
        assert needle in str(error.value) and str(path) in str(error.value)

    def test_unreadable_table(self, table_in_force) -> None:
        path = table_in_force({})
        path.write_text("{not json")
        with pytest.raises(ValueError, match="cannot read a tuning table"):
            tuning.launch(torch.device("cpu"))

    def test_shipped_tables_are_valid_and_named_for_their_device(self) -> None:
        for path in sorted(tuning.TUNED_DIR.glob("*.json")):
            data = json.loads(path.read_text())
            tuning.Launch.from_dict(data, str(path))
            assert tuning.device_file(data["device"]) == path

    def test_a_bad_table_fails_the_engine_at_start_up(self, table_in_force, tiny_model_dir,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
        """Not at its first step, inside the engine loop."""
        table_in_force(dict(expand_block_n=3))
        monkeypatch.setenv(KERNELS_ENV, "triton")
        with pytest.raises(ValueError, match="expand_block_n = 3"):
            make_engine(tiny_model_dir("llama")[1])

    def test_device_file_name(self) -> None:
        assert tuning.device_file("NVIDIA H100 80GB HBM3").name == "NVIDIA_H100_80GB_HBM3.json"

    @pytest.mark.parametrize("programs,num_sms", [(256, 132), (512, 132), (768, 132), (20, 4)])
    def test_sweep_grid_targets_reproduce_the_split(self, programs: int, num_sms: int) -> None:
        """The heuristics double while programs · splits < target · SMs: the target the sweep
        writes must stop them at the split it measured fastest."""
        for want in (1, 2, 4, 8, 16):
            target = programs_per_sm(programs, want, num_sms)
            splits = 1
            while programs * splits < target * num_sms and splits < 16:
                splits *= 2
            assert splits == want, (programs, num_sms, target)

    def test_sweep_table_takes_the_fastest_checked_choice_over_both_modules(self) -> None:
        rows = []
        gen = torch.Generator().manual_seed(0)
        for module in ("q_proj", "down_proj"):
            for block in (128, 256):
                for warps in (2, 4):
                    ms = float(torch.rand(1, generator=gen)) + 1.0
                    rows.append(dict(kernel="lora_expand", module=module, batch=64, block=block,
                                     block_r=16, num_warps=warps, ms=ms, rel_err=1e-3))
        rows.append(dict(kernel="lora_expand", module="q_proj", batch=64, block=64, block_r=16,
                         num_warps=8, ms=0.1, rel_err=None))  # measured for one module only
        rows.append(dict(kernel="lora_expand", module="q_proj", batch=8, block=32, block_r=16,
                         num_warps=1, ms=0.01, rel_err=None))  # another batch
        wrong = dict(kernel="lora_expand", batch=64, block=512, block_r=16, num_warps=4,
                     ms=0.01, rel_err=0.5)  # fastest, but not the reference's result
        rows += [dict(wrong, module="q_proj"), dict(wrong, module="down_proj")]
        totals: dict = {}
        for r in rows[:8]:
            key = (r["block"], r["num_warps"])
            totals[key] = totals.get(key, 0.0) + r["ms"]
        block, warps = min(totals, key=totals.get)
        assert tuned_table(rows, 132) == dict(expand_block_n=block, expand_warps=warps,
                                              expand_block_r=16)

    def test_sweep_table_counts_a_choice_timed_twice_once(self) -> None:
        """Attention times its default split count twice (in the block sweep and in the split
        sweep): that choice must not win for having more rows."""
        def row(block_n: int, splits: int, ms: float) -> dict:
            return dict(kernel="attention_decode", batch=64, block_n=block_n, num_warps=4,
                        splits=splits, programs=512, ms=ms, rel_err=None)
        rows = [row(64, 2, 0.116), row(64, 2, 0.118), row(32, 2, 0.112), row(64, 4, 0.12)]
        table = tuned_table(rows, 132)
        assert table["attention_block_n"] == 32
        assert table["attention_programs_per_sm"] == programs_per_sm(512, 2, 132)


# ---- the kernels under a table far from the defaults ------------------------------------------

SHAPE = Shape("tuned", 160, (40,), 9, (1, 7, 33, 16, 8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_kernels_match_references_under_an_odd_table(table_in_force,
                                                            dtype: torch.dtype) -> None:
    table_in_force(ODD_TABLE)
    gen = gen_for("tuned", dtype)
    p = make_lora_pool(SHAPE, dtype, False, gen)
    slots = make_token_slots(SHAPE.num_tokens, len(SHAPE.ranks), "uniform", gen)
    x = x_for(SHAPE.num_tokens, SHAPE.d_in, dtype, gen)
    a_rows, b_rows, ranks, scales = p["a_rows"][0], p["b_rows"][0], p["ranks"][0], p["scales"][0]
    # The table's grid target splits d_in (160 = 5 blocks of 32) in as many parts as it allows.
    split = lora_t.shrink_split_k(SHAPE.num_tokens, 1, max(SHAPE.ranks), SHAPE.d_in, DEVICE)
    assert split == 4
    want_h = lora_shrink_ref(x, p["pool"], a_rows, ranks, slots)
    assert_close(lora_t.lora_shrink_triton(x, p["pool"], a_rows, ranks, slots), want_h,
                 torch.float32)
    wide, out = poisoned_out(SHAPE.num_tokens, SHAPE.d_outs[0], dtype, slots, gen)
    want = wide.clone()
    lora_expand_ref(want_h, p["pool"], b_rows, ranks, scales, slots, want[:, 3:3 + 40])
    lora_t.lora_expand_triton(want_h, p["pool"], b_rows, ranks, scales, slots, out)
    assert_close(wide, want, dtype)

    case = AttentionCase("tuned_decode", (5, 70, 1, 33), (1, 1, 1, 1), (8, 2), 16, 16)
    kv = make_kv(case, dtype, gen)
    args = (kv["q"], kv["k_cache"], kv["v_cache"], kv["block_tables"], kv["context_lens"],
            kv["query_start_loc"], 0.25)
    assert attn_t.decode_splits(4, 2, kv["block_tables"].shape[1] * 16, 16, DEVICE) > 1
    assert_close(attn_t.paged_attention_triton(*args), paged_attention_ref(*args), dtype)


def test_interpreter_suite_in_child_process() -> None:
    run_in_interpreter_child(__file__)


drop_tests_not_run_here(globals())
