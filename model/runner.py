"""ModelRunner: one `Batch` in, next-token logits out. Owns the frozen model and the KV layout."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from loraplex.memory.kv import KVLayout
from loraplex.model.models.llama import ForwardContext, LlamaModel

if TYPE_CHECKING:  # the contract's type only; the runner never imports the scheduler
    from loraplex.scheduler.batch import Batch


class ModelRunner:
    """Turns a `Batch` into a `ForwardContext` and runs the model under `inference_mode`."""

    def __init__(self, model: LlamaModel, kv_layout: KVLayout):
        self.model = model
        self.kv_layout = kv_layout
        self._kv_caches: list | None = None
        self._pool_ptr: int | None = None

    @torch.inference_mode()
    def run(self, batch: "Batch") -> torch.Tensor:
        """Logits `[len(batch.logits_indices), vocab]` in fp32."""
        device = self.model.embed.device
        if self._pool_ptr != batch.pool.data_ptr():
            self._kv_caches = self.kv_layout.caches(batch.pool)
            self._pool_ptr = batch.pool.data_ptr()

        def dev(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        ctx = ForwardContext(
            positions=dev(batch.positions),
            slot_mapping=dev(batch.slot_mapping),
            block_tables=dev(batch.block_tables),
            context_lens=dev(batch.context_lens),
            query_start_loc=dev(batch.query_start_loc),
            kv_caches=self._kv_caches,
            pool_flat=batch.pool.view(-1),
            tables=batch.adapter_tables,
            lora_token_slots=dev(batch.lora_token_slots),
            shira_token_slots=dev(batch.shira_token_slots),
            has_dora=batch.has_dora,
        )
        return self.model.forward(dev(batch.input_ids), ctx, dev(batch.logits_indices))
