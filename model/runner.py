"""ModelRunner: one `Batch` in, next-token logits out. Owns the frozen model and the KV layout."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from loraplex.kernels.dispatch import use_triton
from loraplex.kernels.tuning import launch
from loraplex.memory.kv import KVLayout
from loraplex.model.config import module_indices
from loraplex.model.graphs import StepGraphs
from loraplex.model.models.llama import ForwardContext, LlamaModel
from loraplex.model.shira_fuse import ShiraFusion

if TYPE_CHECKING:  # the contract's type only; the runner never imports the scheduler
    from loraplex.scheduler.batch import Batch


class ModelRunner:
    """Turns a `Batch` into a `ForwardContext` and runs the model under `inference_mode`.

    On CUDA with the Triton kernels, steps replay CUDA graphs (`graphs`), and prefill steps add
    LoRA per segment (a sequence's tokens share its adapter). A batch that
    names a fused SHiRA adapter (`Batch.shira_fused`) runs as the base model with that adapter
    scattered into the weights (`shira`).
    """

    def __init__(self, model: LlamaModel, kv_layout: KVLayout, *, cuda_graphs: bool = True,
                 max_batch: int = 256, max_pages: int = 0, max_tokens: int = 0):
        self.model = model
        self.kv_layout = kv_layout
        self._kv_caches: list | None = None
        self._pool_ptr: int | None = None
        device = model.embed.device
        self.triton = use_triton(device)
        if self.triton:  # a bad tuning table fails here, at start-up, not in a step
            launch(device)
        self.graphs = StepGraphs(model, max_batch, max_pages, max_tokens) \
            if cuda_graphs and self.triton and device.type == "cuda" and max_pages > 0 else None
        self.shira = ShiraFusion(model)

    @torch.inference_mode()
    def run(self, batch: "Batch") -> torch.Tensor:
        """Logits `[len(batch.logits_indices), vocab]` in fp32."""
        device = self.model.embed.device
        if self._pool_ptr != batch.pool.data_ptr():
            self._kv_caches = self.kv_layout.caches(batch.pool)
            self._pool_ptr = batch.pool.data_ptr()
        pool_flat = batch.pool.view(-1)
        self.shira.switch(batch.shira_fused, pool_flat, batch.adapter_tables)
        if batch.shira_fused is not None:  # the adapter lives in the weights this step
            batch.shira_token_slots = None
            batch.adapter_tables = None
        if self.graphs is not None:
            logits = self.graphs.run(batch, self._kv_caches, pool_flat)
            if logits is not None:
                return logits

        def dev(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        ctx = ForwardContext(
            positions=dev(batch.positions),
            slot_mapping=dev(batch.slot_mapping),
            block_tables=dev(batch.block_tables),
            context_lens=dev(batch.context_lens),
            query_start_loc=dev(batch.query_start_loc),
            kv_caches=self._kv_caches,
            pool_flat=pool_flat,
            tables=batch.adapter_tables,
            lora_token_slots=dev(batch.lora_token_slots),
            shira_token_slots=dev(batch.shira_token_slots),
            has_dora=batch.has_dora,
            adapter_modules=None if batch.adapter_modules is None
            else module_indices(batch.adapter_modules),
        )
        if self.triton and ctx.lora_token_slots is not None \
                and batch.num_tokens > len(batch.seq_ids):
            # Prefill: a sequence's tokens are one segment (the grouped kernels read each
            # adapter row once per block of tokens, not once per token).
            ctx.lora_seg_starts = ctx.query_start_loc
            ctx.lora_seg_slots = dev(batch.lora_sequence_slots())
        return self.model.forward(dev(batch.input_ids), ctx, dev(batch.logits_indices))
