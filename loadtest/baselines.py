"""Baselines: the usual way to serve many adapters with `peft` (set_adapter, one at a time)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from loraplex.loadtest.workload import WorkloadRequest

logger = logging.getLogger(__name__)


def peft_sequential(model_dir: Path, adapters: dict[str, Path],
                    requests: list[WorkloadRequest]) -> tuple[int, float]:
    """Load every adapter into one PeftModel, then per request `set_adapter` + `generate`.

    Returns (generated tokens, seconds) for the generation part only.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    names = sorted({r.adapter for r in requests if r.adapter})
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    num_tokens, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for i, req in enumerate(requests):
            model.set_adapter(req.adapter)
            ids = torch.tensor([req.prompt_ids])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=req.max_tokens, min_new_tokens=req.max_tokens,
                                 do_sample=False, pad_token_id=0)
            num_tokens += out.shape[1] - ids.shape[1]
            if (i + 1) % 10 == 0:
                logger.info("peft baseline: %d/%d requests", i + 1, len(requests))
    return num_tokens, time.perf_counter() - t0
