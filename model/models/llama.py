"""Llama-family forward (Llama, Mistral, Qwen2, Qwen3) over a flat batch of tokens.

K/V are read and written through page tables; every target projection adds the batch's
adapters through `kernels`. Imports only `model.config` and `kernels`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loraplex.kernels.attention import paged_attention
from loraplex.kernels.dispatch import step_memo
from loraplex.kernels.fused import add_rms_norm, rms_norm, rope_write_kv, silu_mul
from loraplex.kernels.lora_slices import lora_apply, lora_apply_segments
from loraplex.kernels.shira import shira_gather
from loraplex.model.config import TARGET_MODULES, ModelConfig

Q, K, V, O, GATE, UP, DOWN = range(len(TARGET_MODULES))


@dataclass(slots=True)
class ForwardContext:
    """Per-step tensors the forward needs (filled by the runner from a `Batch`)."""

    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64 page * page_size + offset
    block_tables: torch.Tensor  # [B, max_pages] int32
    context_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B + 1] int32
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, views into the pool
    pool_flat: torch.Tensor  # [num_pages * page_numel]
    tables: object | None  # memory.adapters.AdapterTables, or None when no token has an adapter
    lora_token_slots: torch.Tensor | None  # [T] int64, -1: none; None: no LoRA/DoRA token
    shira_token_slots: torch.Tensor | None  # [T] int64, -1: none; None: no SHiRA token
    has_dora: bool = False
    lora_seg_starts: torch.Tensor | None = None  # [B + 1] prefill: the LoRA segments (sequences)
    lora_seg_slots: torch.Tensor | None = None  # [B] their slots; None: decode form per token
    adapter_modules: frozenset[int] | None = None  # modules some adapter targets; None: all


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """[head_dim / 2] fp32 inverse frequencies, with `linear` or `llama3` scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = config.rope_scaling or {}
    if config.rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if config.rope_type == "llama3":
        # Llama 3.1: long wavelengths divided by `factor`, short kept, smooth in between.
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_mid, mid, scaled)
    return inv_freq


class LlamaModel:
    """The frozen base model's tensors and its forward over one step."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor]):
        self.config = config
        c = config
        self.embed = weights["model.embed_tokens.weight"]
        self.norm = weights["model.norm.weight"]
        self.lm_head = weights.get("lm_head.weight", self.embed)
        if c.tie_word_embeddings:
            self.lm_head = self.embed
        self.layers = [self._layer(weights, i) for i in range(c.num_layers)]
        self.inv_freq = rope_inv_freq(c).to(self.embed.device)
        # Split points of the fused q|k|v and gate|up outputs.
        self.qkv_sizes = (c.q_size, c.kv_size, c.kv_size)
        self.gate_up_sizes = (c.intermediate_size, c.intermediate_size)

    def _layer(self, w: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor | None]:
        p = f"model.layers.{i}."
        att, mlp = p + "self_attn.", p + "mlp."

        def bias(name: str) -> torch.Tensor | None:
            return w.get(name + ".bias")

        qkv_bias = [bias(att + m) for m in ("q_proj", "k_proj", "v_proj")]
        return {
            "input_norm": w[p + "input_layernorm.weight"],
            "post_norm": w[p + "post_attention_layernorm.weight"],
            # Fused projections: one matmul each, adapters add to the slices in place.
            "qkv": torch.cat([w[att + m + ".weight"] for m in ("q_proj", "k_proj", "v_proj")]),
            "qkv_bias": None if qkv_bias[0] is None else torch.cat(qkv_bias),
            "o": w[att + "o_proj.weight"],
            "o_bias": bias(att + "o_proj"),
            "q_norm": w.get(att + "q_norm.weight"),
            "k_norm": w.get(att + "k_norm.weight"),
            "gate_up": torch.cat([w[mlp + "gate_proj.weight"], w[mlp + "up_proj.weight"]]),
            "gate_up_bias": None if bias(mlp + "gate_proj") is None
            else torch.cat([bias(mlp + "gate_proj"), bias(mlp + "up_proj")]),
            "down": w[mlp + "down_proj.weight"],
            "down_bias": bias(mlp + "down_proj"),
        }

    def base_weight(self, layer: int, module: str) -> torch.Tensor:
        """[d_out, d_in] the frozen weight of one target module (DoRA's norm needs it)."""
        m = TARGET_MODULES.index(module)
        lw = self.layers[layer]
        if m in (Q, K, V):
            starts = (0, self.qkv_sizes[0], self.qkv_sizes[0] + self.qkv_sizes[1])
            return lw["qkv"][starts[m]: starts[m] + self.qkv_sizes[m]]
        if m in (GATE, UP):
            n = self.gate_up_sizes[0]
            return lw["gate_up"][(m - GATE) * n: (m - GATE + 1) * n]
        return lw["o"] if m == O else lw["down"]

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext,
                logits_indices: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] → logits [len(logits_indices), vocab] (fp32)."""
        eps = self.config.rms_norm_eps
        h = self.embed[input_ids]  # [T, hidden]
        # cos/sin once per step, rounded to h's dtype before use (as HF's rotary embedding).
        freqs = ctx.positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)  # [T, head_dim]
        # Each residual add is fused with the norm that reads its sum (one launch each).
        x = rms_norm(h, self.layers[0]["input_norm"], eps)
        with step_memo():  # index maps of the step's segments and queries: once, not per layer
            for i, lw in enumerate(self.layers):
                h, x = add_rms_norm(h, self._attention(i, lw, x, cos, sin, ctx),
                                    lw["post_norm"], eps)
                delta = self._mlp(i, lw, x, ctx)  # [T, hidden]
                if i + 1 == len(self.layers):
                    h = h + delta  # the final norm reads only the logits rows
                else:
                    h, x = add_rms_norm(h, delta, self.layers[i + 1]["input_norm"], eps)
        h = rms_norm(h[logits_indices], self.norm, eps)
        return (h @ self.lm_head.T).float()

    def _attention(self, i: int, lw: dict, x: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        c = self.config
        qkv = self._project(i, (Q, K, V), x, lw["qkv"], lw["qkv_bias"], ctx)
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        num_tokens = x.shape[0]
        q = q.reshape(num_tokens, c.num_heads, c.head_dim)
        k = k.reshape(num_tokens, c.num_kv_heads, c.head_dim)
        v = v.reshape(num_tokens, c.num_kv_heads, c.head_dim)
        if lw["q_norm"] is not None:
            q = rms_norm(q, lw["q_norm"], c.rms_norm_eps)
            k = rms_norm(k, lw["k_norm"], c.rms_norm_eps)
        k_cache, v_cache = ctx.kv_caches[i]
        # q rotated [T, H_q, D]; k rotated and v into their pages (one launch on the GPU path).
        q = rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, ctx.slot_mapping)
        out = paged_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens,
                              ctx.query_start_loc, c.head_dim ** -0.5)
        out = out.reshape(num_tokens, c.q_size)
        return self._project(i, (O,), out, lw["o"], lw["o_bias"], ctx)

    def _mlp(self, i: int, lw: dict, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        gate_up = self._project(i, (GATE, UP), x, lw["gate_up"], lw["gate_up_bias"], ctx)
        return self._project(i, (DOWN,), silu_mul(gate_up), lw["down"], lw["down_bias"], ctx)

    def _project(self, layer: int, modules: tuple[int, ...], x: torch.Tensor,
                 weight: torch.Tensor, bias: torch.Tensor | None,
                 ctx: ForwardContext) -> torch.Tensor:
        """y = W x (+ adapters on each module's slice of y) + b; DoRA scales before the bias."""
        y = x @ weight.T
        if ctx.tables is not None:
            self._add_adapters(layer, modules, x, y, ctx)
        return y if bias is None else y + bias

    def _add_adapters(self, layer: int, modules: tuple[int, ...], x: torch.Tensor,
                      y: torch.Tensor, ctx: ForwardContext) -> None:
        """Every adapter of the batch on the fused output y (slices of consecutive modules).

        With `ctx.adapter_modules`, modules no adapter of the batch targets are skipped, and
        the rest go in runs of consecutive modules (one launch per run)."""
        sizes = [self.config.module_shape(TARGET_MODULES[m])[0] for m in modules]
        starts = [sum(sizes[:i]) for i in range(len(modules))]
        run: list[int] = []  # indices into `modules` of the current run

        def flush() -> None:
            if run:
                cols = y[:, starts[run[0]]:starts[run[-1]] + sizes[run[-1]]]
                self._add_run(layer, [modules[j] for j in run], [sizes[j] for j in run], x,
                              cols, ctx)
                run.clear()

        for i, m in enumerate(modules):
            if ctx.adapter_modules is None or m in ctx.adapter_modules:
                run.append(i)
            else:
                flush()
        flush()

    def _add_run(self, layer: int, modules: list[int], sizes: list[int], x: torch.Tensor,
                 y: torch.Tensor, ctx: ForwardContext) -> None:
        """The adapters on consecutive modules whose outputs are y's columns, in order."""
        t = ctx.tables
        ms = slice(modules[0], modules[-1] + 1)
        if ctx.lora_token_slots is not None:
            tables = (t.a_rows[layer, ms], t.b_rows[layer, ms], t.ranks[layer, ms],
                      t.scales[layer, ms])
            g_rows = t.g_rows[layer, ms] if ctx.has_dora else None
            if ctx.lora_seg_slots is None:
                lora_apply(x, ctx.pool_flat, *tables, ctx.lora_token_slots, y, tuple(sizes),
                           g_rows)
            else:
                lora_apply_segments(x, ctx.pool_flat, *tables, ctx.lora_seg_starts,
                                    ctx.lora_seg_slots, y, tuple(sizes), g_rows)
        if ctx.shira_token_slots is not None:
            start = 0
            for m, d_out in zip(modules, sizes):
                shira_gather(x, ctx.pool_flat, ctx.pool_flat.view(torch.int32),
                             t.a_rows[layer, m], t.b_rows[layer, m], t.ranks[layer, m],
                             t.scales[layer, m], ctx.shira_token_slots,
                             y[:, start:start + d_out])
                start += d_out
