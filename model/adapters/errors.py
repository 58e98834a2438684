"""Errors for bad adapter folders: one class per kind of problem, all `AdapterError`s.

Raised by `model.adapters.peft`; `server/errors.py` maps them to HTTP 400. Imports nothing.
"""

from __future__ import annotations


class AdapterError(ValueError):
    """Base: a bad adapter; the message names the problem and the folder."""


class AdapterNotFoundError(AdapterError):
    """The adapter folder, or a file it must contain, does not exist."""


class AdapterFormatError(AdapterError):
    """Not safetensors, unreadable json, missing or malformed tensors, non-finite values."""


class UnsupportedAdapterError(AdapterError):
    """A PEFT type other than LORA/SHIRA, or an option we do not serve (fan_in_fan_out, bias…)."""


class AdapterShapeError(AdapterError):
    """A tensor on a module the base model lacks, or whose shape disagrees with the base."""


class AdapterRankError(AdapterError):
    """Rank above the configured maximum (SHiRA: nnz above `max_rank · (d_in + d_out)`)."""
