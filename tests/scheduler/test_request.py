"""Sequence bookkeeping the scheduler builds each step's batch from."""

from __future__ import annotations

import pytest

from loraplex.model.sampler import SamplingParams
from loraplex.scheduler.request import Prefix, Request, Sequence
from tests.conftest import make_engine


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


def test_prefix_reads_the_first_n_items_in_place_as_a_list_would() -> None:
    """A running request's output shows its tokens so far without a copy: later appends to the
    sequence's list do not show in it, and it reads, slices and compares like that list."""
    items = [5, 6, 7]
    prefix = Prefix(items)
    items += [8, 9]
    snapshot = [5, 6, 7]
    assert len(prefix) == 3 and list(prefix) == snapshot and prefix == snapshot
    assert prefix == tuple(snapshot) and prefix != [5, 6, 7, 8] and prefix != [5, 6]
    for i in range(-3, 3):
        assert prefix[i] == snapshot[i]
    for bad in (3, -4, 10):
        with pytest.raises(IndexError):
            prefix[bad]
    for sl in (slice(None), slice(1, None), slice(-2, None), slice(0, 10), slice(None, None, 2),
               slice(5, 9), slice(None, None, -1)):
        assert prefix[sl] == snapshot[sl]
    assert repr(prefix) == repr(snapshot) and list(Prefix(items, 0)) == []
    with pytest.raises(TypeError):
        hash(prefix)


def test_step_outputs_show_every_token_so_far_and_keep_their_length(tiny_model_dir) -> None:
    """Each step's output of a request holds the tokens up to that step (the final output's
    prefix), still after later steps; the final output's lists are its own."""
    engine = make_engine(tiny_model_dir("llama")[1])
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2)
    request_id = engine.add_request([3, 4, 5, 6], params, None)
    outputs = []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.request_id == request_id]
    final = outputs[-1]
    assert final.finished and isinstance(final.token_ids, list) and len(final.token_ids) == 6
    for i, out in enumerate(outputs):
        assert len(out.token_ids) == i + 1 and out.token_ids == final.token_ids[:i + 1]
        assert out.new_token_ids == final.token_ids[i:i + 1]
        assert len(out.logprobs) == i + 1 and list(out.logprobs) == final.logprobs[:i + 1]
