"""Launch parameters of the decode kernels (LoRA shrink/expand, decode attention): built-in
defaults, or a table tuned on one GPU.

A table is a JSON object holding some of `Launch`'s fields (and, to document it, "device" and
"source"); `python -m loraplex.loadtest.bench_sweep --tuned FILE` writes one from its timings.
The table in force is the first of: the file named by LORAPLEX_KERNEL_TUNING (on any device, so
that the interpreter tests run tables too), for a CUDA device the file shipped for its name
(`kernels/tuned/<name>.json`), the defaults. Every choice computes the same function (the
interpreter tests cover the block sizes); only the speed differs. Read once per device;
`launch.cache_clear()` re-reads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV = "LORAPLEX_KERNEL_TUNING"
TUNED_DIR = Path(__file__).with_name("tuned")
_NOTES = {"device", "source"}


@dataclasses.dataclass(frozen=True)
class Launch:
    shrink_block_k: int = 256  # decode shrink: d_in per loop step
    shrink_warps: int = 4
    shrink_programs_per_sm: float = 4.0  # split d_in until the grid has about this many per SM
    expand_block_n: int = 128  # decode expand: output columns per program
    expand_block_r: int = 16  # rank rows per loop step
    expand_warps: int = 4
    attention_block_n: int = 64  # decode attention: keys per loop step
    attention_warps: int = 4
    attention_programs_per_sm: float = 4.0  # split the keys until the grid has about this many

    @classmethod
    def from_dict(cls, data: dict, source: str) -> "Launch":
        """A table's fields over the defaults; ValueError naming `source` for a bad one."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a tuning table is a JSON object, not {type(data)}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(names) - _NOTES
        if unknown:
            raise ValueError(f"{source}: unknown fields {sorted(unknown)}; known: "
                             f"{sorted(names)}")
        values = {}
        for key, value in data.items():
            if key in _NOTES:
                continue
            if names[key].type == "int":
                ok = isinstance(value, int) and not isinstance(value, bool) \
                    and 1 <= value <= 1024 and value & (value - 1) == 0
                want = "a power of two from 1 to 1024"
            else:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and 0 < value <= 1024
                want = "a number in (0, 1024]"
            if not ok:
                raise ValueError(f"{source}: {key} = {value!r}, want {want}")
            values[key] = value
        return cls(**values)

    def changed(self) -> dict:
        """The fields that differ from the defaults."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v != getattr(Launch(), k)}


def device_file(device_name: str) -> Path:
    """Where the table shipped for a GPU of this name lives."""
    return TUNED_DIR / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


def read_table(path: Path) -> Launch:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read a tuning table: {error}") from error
    return Launch.from_dict(data, str(path))


@functools.cache
def launch(device: torch.device) -> Launch:
    """The launch parameters for `device`."""
    named = os.environ.get(ENV)
    if named:  # on any device: the interpreter tests run tables on the CPU
        source = named
    elif device.type == "cuda":
        source = str(device_file(torch.cuda.get_device_name(device)))
        if not Path(source).is_file():
            return Launch()
    else:
        return Launch()
    table = read_table(Path(source))
    log.info("kernel launch parameters from %s: %s", source, table.changed())
    return table
