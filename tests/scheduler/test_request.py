"""Sequence bookkeeping the scheduler builds each step's batch from."""

from __future__ import annotations

import pytest

from loraplex.model.sampler import SamplingParams
from loraplex.scheduler.request import Request, Sequence


@pytest.mark.parametrize("start,end", [(0, 4), (2, 5), (3, 9), (5, 6), (7, 10), (0, 10),
                                       (9, 10), (4, 4)])
def test_token_ids_are_the_slice_of_prompt_then_output(start: int, end: int) -> None:
    """Any window: inside the prompt, across its end (recompute after a preemption), or inside
    the output (decode asks for the last token only)."""
    prompt, output = (11, 12, 13, 14, 15), [21, 22, 23, 24, 25]
    seq = Sequence(0, Request("r", prompt, SamplingParams(), None), None,
                   output_ids=list(output))
    assert seq.token_ids(start, end) == (list(prompt) + output)[start:end]
    got = seq.token_ids(start, end)
    got.append(-1)  # a new list: the sequence's own tokens are untouched
    assert seq.output_ids == output and seq.request.prompt_ids == prompt
