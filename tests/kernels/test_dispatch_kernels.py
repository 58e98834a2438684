"""Dispatch between references and Triton twins."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels import dispatch
from loraplex.kernels.lora import lora_shrink_ref


def test_cpu_always_uses_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.KERNELS_ENV, raising=False)
    assert dispatch.use_triton("cpu") is False
    assert dispatch.pick(lora_shrink_ref, "cpu") is lora_shrink_ref


def test_cuda_uses_triton_only_when_importable_and_not_forced_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "has_triton", lambda: True)
    monkeypatch.delenv(dispatch.KERNELS_ENV, raising=False)
    assert dispatch.use_triton("cuda") is True
    monkeypatch.setenv(dispatch.KERNELS_ENV, "ref")
    assert dispatch.use_triton("cuda:0") is False
    monkeypatch.delenv(dispatch.KERNELS_ENV)
    monkeypatch.setattr(dispatch, "has_triton", lambda: False)
    assert dispatch.use_triton("cuda") is False


def test_pick_falls_back_to_the_reference_without_a_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "has_triton", lambda: True)
    monkeypatch.delenv(dispatch.KERNELS_ENV, raising=False)

    def orphan_ref() -> None:
        """A reference that has no Triton twin anywhere."""

    orphan_ref.__module__ = "loraplex.kernels.lora"
    assert dispatch.pick(orphan_ref, "cuda") is orphan_ref


def test_pick_finds_the_triton_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    from loraplex.kernels import lora

    def lora_shrink_triton() -> None:
        """Stand-in twin: dispatch only looks it up by name."""

    monkeypatch.setattr(dispatch, "has_triton", lambda: True)
    monkeypatch.delenv(dispatch.KERNELS_ENV, raising=False)
    monkeypatch.setattr(lora, "lora_shrink_triton", lora_shrink_triton, raising=False)
    assert dispatch.pick(lora_shrink_ref, "cuda") is lora_shrink_triton
    assert dispatch.pick(lora_shrink_ref, "cpu") is lora_shrink_ref


def test_step_memo_derives_once_per_source_tensor_and_only_inside() -> None:
    calls: list[int] = []

    def derive(t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return t.cumsum(0)

    starts, other = torch.tensor([0, 3, 5]), torch.tensor([0, 3, 5])
    assert torch.equal(dispatch.memoized("blocks", starts, (5,), lambda: derive(starts)),
                       torch.tensor([0, 3, 8]))
    dispatch.memoized("blocks", starts, (5,), lambda: derive(starts))
    assert len(calls) == 2  # no memo: derived every time
    with dispatch.step_memo():
        first = dispatch.memoized("blocks", starts, (5,), lambda: derive(starts))
        assert dispatch.memoized("blocks", starts, (5,), lambda: derive(starts)) is first
        assert len(calls) == 3
        dispatch.memoized("blocks", other, (5,), lambda: derive(other))  # equal, not the same
        dispatch.memoized("blocks", starts, (6,), lambda: derive(starts))  # other shapes
        dispatch.memoized("rows", starts, (5,), lambda: derive(starts))  # other name
        assert len(calls) == 6
        with dispatch.step_memo():  # a nested forward (a graph capture) starts afresh
            dispatch.memoized("blocks", starts, (5,), lambda: derive(starts))
            assert len(calls) == 7
        assert dispatch.memoized("blocks", starts, (5,), lambda: derive(starts)) is first
    dispatch.memoized("blocks", starts, (5,), lambda: derive(starts))
    assert len(calls) == 8
