"""The embedded demo model (SmolLM2-135M-Instruct from its GGUF) answers through our engine."""

from __future__ import annotations

import pytest

from loraplex.model.sampler import SamplingParams
from loraplex.scheduler.engine import Engine, EngineConfig


@pytest.mark.slow
def test_demo_model_knows_the_capital_of_france():
    engine = Engine(EngineConfig(device="cpu"))
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}])
    [out] = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0))
    assert "Paris" in out.text, out.text
    assert out.finish_reason in ("stop", "length")
    assert engine.pool.num_kv_pages == 0
