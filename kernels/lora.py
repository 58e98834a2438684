"""Heterogeneous-rank LoRA shrink/expand reading A and Bᵀ rows in place from the page pool.

Decode form (one adapter slot per token) and prefill form (segments of tokens per slot); torch
references plus the public entry points. Imports only `kernels.dispatch`.
"""

from __future__ import annotations

import threading

from collections.abc import Callable
from typing import NamedTuple

import torch

from loraplex.kernels.dispatch import INDEX_DTYPES, check, check_same_device, check_tensor, pick
from loraplex.kernels.dora import dora_scale


class TokenGroups(NamedTuple):
    """Tokens that have an adapter, bucketed by slot into `num_chunks` padded chunks of `width`.

    A slot with many tokens is split over several chunks of at most `width` tokens, so that a
    skewed batch pads to at most ~4 × its token count (Punica's `skewed` case).
    """

    tokens: torch.Tensor  # [V] int64 index of each token that has an adapter
    chunk: torch.Tensor  # [V] int64 chunk of each of those tokens
    pos: torch.Tensor  # [V] int64 its position inside the chunk
    chunk_slots: torch.Tensor  # [num_chunks] int64 slot of each chunk
    width: int  # tokens per chunk, padded

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """[T, *rest] → [num_chunks, width, *rest], zeros where a chunk has fewer tokens."""
        buf = t.new_zeros((self.chunk_slots.shape[0] * self.width, *t.shape[1:]))
        buf[self.chunk * self.width + self.pos] = t[self.tokens]
        return buf.view(self.chunk_slots.shape[0], self.width, *t.shape[1:])

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        """[num_chunks, width, *rest] → [V, *rest] in the order of `tokens`."""
        return t.flatten(0, 1)[self.chunk * self.width + self.pos]


class _LastGroups(threading.local):
    """One-entry memo per thread: a step calls the references once per layer and module with
    the same `token_slots` tensor; grouping it once per step instead of ~200 times halves their
    cost. Keyed on the tensor object itself (held, so its memory cannot be reused) and its
    version."""

    def __init__(self) -> None:
        self.key: tuple[torch.Tensor, int] | None = None
        self.values: dict[Callable, object] = {}

    def get(self, token_slots: torch.Tensor, fn: Callable[[torch.Tensor], object]) -> object:
        if token_slots.is_inference():  # no version counter: nothing proves it unchanged
            return fn(token_slots)
        key = self.key
        if key is None or key[0] is not token_slots or key[1] != token_slots._version:
            self.key, self.values = (token_slots, token_slots._version), {}
        if fn not in self.values:
            self.values[fn] = fn(token_slots)
        return self.values[fn]


_last_groups = _LastGroups()


def group_tokens(token_slots: torch.Tensor) -> TokenGroups | None:
    """Bucket the tokens with `token_slots >= 0` by slot; None when no token has one."""
    return _last_groups.get(token_slots, _group_tokens)  # type: ignore[return-value]


class DistinctSlots(NamedTuple):
    tokens: torch.Tensor  # [V] int64 tokens that have an adapter
    slots: torch.Tensor  # [G] int64 the distinct slots among them
    inverse: torch.Tensor  # [V] int64 index into `slots` of each token's slot


def _distinct_slots(token_slots: torch.Tensor) -> DistinctSlots | None:
    tokens = torch.nonzero(token_slots >= 0).squeeze(1)
    if tokens.shape[0] == 0:
        return None
    slots, inverse = torch.unique(token_slots[tokens].long(), return_inverse=True)
    return DistinctSlots(tokens, slots, inverse)


DENSE_LIMIT = 1 << 15
"""Tokens × live rows under which the references take the masked dense path (measured on the
2-core CPU at the demo model's widths, 64 tokens of ranks 8–64: dense wins up to about 8–16
distinct adapters, the grouped path, multiplying each rank bucket at its rank, above)."""


def _dense_plan(token_slots: torch.Tensor, rows: torch.Tensor, ranks: torch.Tensor
                ) -> tuple[DistinctSlots, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """For the masked dense path: (distinct slots, flat offsets of the live rows of the batch's
    adapters [L], each token's column of rank i in those rows [V, R], validity [V, R]); None
    when the batch is too large for it (the grouped path then runs)."""
    distinct: DistinctSlots | None = _last_groups.get(token_slots, _distinct_slots)
    if distinct is None:
        return None
    r = ranks[distinct.slots].long()  # [G]
    if distinct.tokens.shape[0] * int(r.sum()) > DENSE_LIMIT:
        return None
    width = rows.shape[1]
    i = torch.arange(width, device=rows.device)
    keep = i[None, :] < r[:, None]  # [G, R]
    offsets = rows[distinct.slots][keep]  # [L] slot-major, rank-minor
    col_start = torch.cumsum(r, 0) - r  # [G]
    valid = i[None, :] < r[distinct.inverse][:, None]  # [V, R]
    cols = (col_start[distinct.inverse][:, None] + i[None, :]).clamp(
        max=max(offsets.shape[0] - 1, 0))
    return distinct, offsets, cols, valid


def _group_tokens(token_slots: torch.Tensor) -> TokenGroups | None:
    tokens = torch.nonzero(token_slots >= 0).squeeze(1)  # [V]
    num_valid = tokens.shape[0]
    if num_valid == 0:
        return None
    slots, group, counts = torch.unique(token_slots[tokens].long(), return_inverse=True,
                                        return_counts=True)  # [G], [V], [G]
    order = torch.argsort(group, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(group)
    pos[order] = torch.arange(num_valid, device=group.device) - starts[group[order]]
    width = -(-num_valid // slots.shape[0])  # mean tokens per slot, rounded up
    chunks_per_slot = -(-counts // width)  # [G]
    first_chunk = torch.cumsum(chunks_per_slot, 0) - chunks_per_slot
    return TokenGroups(
        tokens=tokens,
        chunk=first_chunk[group] + pos // width,
        pos=pos % width,
        chunk_slots=torch.repeat_interleave(slots, chunks_per_slot),
        width=width,
    )


def gather_rows(pool_flat: torch.Tensor, rows: torch.Tensor, ranks: torch.Tensor,
                row_len: int) -> torch.Tensor:
    """fp32 copy of rows `pool_flat[rows[u, i] : + row_len]`, zero where `i >= ranks[u]`.

    rows: [U, R] int64 flat offsets (garbage beyond the rank); ranks: [U] → [U, R, row_len].
    Only live rows are read: a masked row may point anywhere, even at NaNs of a KV page.
    """
    keep = torch.arange(rows.shape[1], device=rows.device) < ranks[:, None]  # [U, R]
    live = torch.nonzero(keep.flatten()).squeeze(1)  # [sum of ranks]
    out = torch.zeros(rows.numel(), row_len, dtype=torch.float32, device=rows.device)
    windows = pool_flat.unfold(0, row_len, 1)  # [numel - row_len + 1, row_len], a view
    # index_select on the window view copies each row once (much faster than windows[offsets]).
    out.index_copy_(0, live, windows.index_select(0, rows.flatten()[live]).float())
    return out.view(*rows.shape, row_len)


def rank_buckets(chunk_ranks: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(rank, indices of the chunks of that rank) for each distinct non-zero rank: the grouped
    paths multiply each bucket at its own rank instead of padding all to the table's width."""
    return [(v, torch.nonzero(chunk_ranks == v).squeeze(1))
            for v in torch.unique(chunk_ranks).tolist() if v > 0]


def gather_block(pool_flat: torch.Tensor, rows: torch.Tensor, rank: int,
                 row_len: int) -> torch.Tensor:
    """fp32 copy of rows `pool_flat[rows[u, i] : + row_len]` for i < rank → [U, rank, row_len]."""
    flat = pool_flat.unfold(0, row_len, 1).index_select(0, rows[:, :rank].flatten())
    return flat.float().view(rows.shape[0], rank, row_len)


def segments_to_token_slots(seg_starts: torch.Tensor, seg_slots: torch.Tensor,
                            num_tokens: int) -> torch.Tensor:
    """[G+1] boundaries, [G] slots → [num_tokens] int64 slot per token (-1 outside segments)."""
    lengths = seg_starts[1:] - seg_starts[:-1]  # [G]
    token_slots = torch.full((num_tokens,), -1, dtype=torch.int64, device=seg_slots.device)
    if seg_slots.shape[0] > 0:
        first, last = int(seg_starts[0]), int(seg_starts[-1])
        token_slots[first:last] = torch.repeat_interleave(seg_slots.long(), lengths,
                                                          output_size=last - first)
    return token_slots


def lora_shrink_ref(x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor,
                    ranks: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """Semantics:  h = zeros(T, R); for each token t with s = token_slots[t] >= 0:
                    A = stack([pool_flat[a_rows[s, i] : + d_in] for i < ranks[s]])
                    h[t, :ranks[s]] = A.float() @ x[t].float()
    x: [T, d_in] pool dtype; pool_flat: [numel] pool dtype; a_rows: [S, R] int64;
    ranks: [S] int32/int64; token_slots: [T] int64 (-1: no adapter) → h: [T, R] float32 (new).
    """
    d_in = x.shape[1]
    h = torch.zeros((x.shape[0], a_rows.shape[1]), dtype=torch.float32, device=x.device)
    plan = _dense_plan(token_slots, a_rows, ranks)
    if plan is not None:
        # Masked dense: one matmul against every live row of the batch's adapters (each read
        # once), then each token keeps its own adapter's columns. Decode-sized batches.
        distinct, offsets, cols, valid = plan
        if offsets.shape[0]:
            a = pool_flat.unfold(0, d_in, 1).index_select(0, offsets).float()  # [L, d_in]
            full = x[distinct.tokens].float() @ a.T  # [V, L]
            h[distinct.tokens] = torch.where(valid, full.gather(1, cols), 0.0)
        return h
    groups = group_tokens(token_slots)
    if groups is None:
        return h
    slots = groups.chunk_slots
    x_pad = groups.pad(x.float())  # [N, width, d_in]
    h_pad = x_pad.new_zeros(x_pad.shape[0], x_pad.shape[1], h.shape[1])  # [N, width, R]
    for rank, chunks in rank_buckets(ranks[slots]):
        a = gather_block(pool_flat, a_rows[slots[chunks]], rank, d_in)  # [n, rank, d_in]
        h_pad[chunks, :, :rank] = torch.bmm(x_pad[chunks], a.transpose(1, 2))
    h[groups.tokens] = groups.unpad(h_pad)
    return h


def lora_expand_ref(h: torch.Tensor, pool_flat: torch.Tensor, b_rows: torch.Tensor,
                    ranks: torch.Tensor, scales: torch.Tensor, token_slots: torch.Tensor,
                    out: torch.Tensor) -> None:
    """Semantics:  for each token t with s = token_slots[t] >= 0:
                    Bt = stack([pool_flat[b_rows[s, i] : + d_out] for i < ranks[s]])
                    out[t] += scales[s] * h[t, :ranks[s]] @ Bt.float()
    h: [T, R] float32; pool_flat: [numel] pool dtype; b_rows: [S, R] int64;
    ranks: [S] int32/int64; scales: [S] float32; token_slots: [T] int64;
    out: [T, d_out] pool dtype, written in place (may be a column slice of a wider tensor).
    """
    d_out = out.shape[1]
    plan = _dense_plan(token_slots, b_rows, ranks)
    if plan is not None:
        distinct, offsets, cols, valid = plan
        if offsets.shape[0]:
            bt = pool_flat.unfold(0, d_out, 1).index_select(0, offsets).float()  # [L, d_out]
            scale = scales[distinct.slots].float()[distinct.inverse][:, None]  # [V, 1]
            hv = torch.where(valid, h[distinct.tokens].float(), 0.0) * scale  # [V, R]
            spread = hv.new_zeros(hv.shape[0], offsets.shape[0]).scatter_add_(1, cols, hv)
            rows = distinct.tokens
            out[rows] = (out[rows].float() + spread @ bt).to(out.dtype)
        return
    groups = group_tokens(token_slots)
    if groups is None:
        return
    slots = groups.chunk_slots
    h_pad = groups.pad(h.float()) * scales[slots].float()[:, None, None]  # [N, width, R]
    y_pad = h_pad.new_zeros(h_pad.shape[0], h_pad.shape[1], d_out)
    for rank, chunks in rank_buckets(ranks[slots]):
        bt = gather_block(pool_flat, b_rows[slots[chunks]], rank, d_out)  # [n, rank, d_out]
        y_pad[chunks] = torch.bmm(h_pad[chunks, :, :rank], bt)
    y = groups.unpad(y_pad)  # [V, d_out]
    rows = groups.tokens
    out[rows] = (out[rows].float() + y).to(out.dtype)


def lora_shrink_segments_ref(x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor,
                             ranks: torch.Tensor, seg_starts: torch.Tensor,
                             seg_slots: torch.Tensor) -> torch.Tensor:
    """Semantics:  for each segment g and token t in seg_starts[g] : seg_starts[g+1]:
                    h[t] = lora_shrink_ref(...) row of t with token_slots[t] = seg_slots[g]
                    (tokens outside every segment, or of a segment with slot -1: zeros)
    x: [T, d_in]; a_rows: [S, R] int64; ranks: [S]; seg_starts: [G+1] int64 (non-decreasing,
    empty segments allowed); seg_slots: [G] int64 → h: [T, R] float32 (new).
    """
    token_slots = segments_to_token_slots(seg_starts, seg_slots, x.shape[0])
    return lora_shrink_ref(x, pool_flat, a_rows, ranks, token_slots)


def lora_expand_segments_ref(h: torch.Tensor, pool_flat: torch.Tensor, b_rows: torch.Tensor,
                             ranks: torch.Tensor, scales: torch.Tensor, seg_starts: torch.Tensor,
                             seg_slots: torch.Tensor, out: torch.Tensor) -> None:
    """Semantics:  for each segment g and token t in seg_starts[g] : seg_starts[g+1]
                    with s = seg_slots[g] >= 0:
                    out[t] += scales[s] * h[t, :ranks[s]] @ Bt(s).float()
    h: [T, R] float32; b_rows: [S, R] int64; ranks: [S]; scales: [S] float32;
    seg_starts: [G+1] int64; seg_slots: [G] int64; out: [T, d_out], written in place.
    """
    token_slots = segments_to_token_slots(seg_starts, seg_slots, out.shape[0])
    lora_expand_ref(h, pool_flat, b_rows, ranks, scales, token_slots, out)


def _check_tables(pool_flat: torch.Tensor, rows: torch.Tensor, ranks: torch.Tensor) -> None:
    check_tensor("pool_flat", pool_flat, 1)
    check_tensor("rows", rows, 2, torch.int64)
    check_tensor("ranks", ranks, 1, INDEX_DTYPES)
    check(ranks.shape[0] == rows.shape[0],
          lambda: f"ranks {tuple(ranks.shape)} and row table {tuple(rows.shape)} disagree on slots")


def _check_segments(seg_starts: torch.Tensor, seg_slots: torch.Tensor, num_tokens: int) -> None:
    check_tensor("seg_starts", seg_starts, 1, INDEX_DTYPES)
    check_tensor("seg_slots", seg_slots, 1, INDEX_DTYPES)
    check(seg_starts.shape[0] == seg_slots.shape[0] + 1,
          lambda: f"seg_starts {tuple(seg_starts.shape)} must have one more entry than seg_slots")
    check(seg_slots.shape[0] == 0 or int(seg_starts[-1]) <= num_tokens,
          lambda: f"segments end past the {num_tokens} tokens")


def lora_shrink(x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor,
                ranks: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """Checked entry point of `lora_shrink_ref` (same semantics; Triton on CUDA when present)."""
    check_tensor("x", x, 2, pool_flat.dtype)
    _check_tables(pool_flat, a_rows, ranks)
    check_tensor("token_slots", token_slots, 1, INDEX_DTYPES)
    check(token_slots.shape[0] == x.shape[0], "token_slots and x disagree on tokens")
    check_same_device(x=x, pool_flat=pool_flat, a_rows=a_rows, token_slots=token_slots)
    if x.shape[0] == 0 or a_rows.shape[1] == 0:
        return torch.zeros((x.shape[0], a_rows.shape[1]), dtype=torch.float32, device=x.device)
    return pick(lora_shrink_ref, x.device)(x, pool_flat, a_rows, ranks, token_slots)


def _check_expand(h: torch.Tensor, pool_flat: torch.Tensor, b_rows: torch.Tensor,
                  ranks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
    check_tensor("h", h, 2, torch.float32)
    _check_tables(pool_flat, b_rows, ranks)
    check_tensor("scales", scales, 1, torch.float32)
    check_tensor("out", out, 2, pool_flat.dtype)
    check(h.shape == (out.shape[0], b_rows.shape[1]),
          lambda: f"h {tuple(h.shape)} must be [out tokens {out.shape[0]}, "
                  f"max_rank {b_rows.shape[1]}]")
    check(scales.shape[0] == b_rows.shape[0], "scales and row table disagree on slots")
    check_same_device(h=h, pool_flat=pool_flat, b_rows=b_rows, out=out)


def _check_g_rows(g_rows: torch.Tensor | None, b_rows: torch.Tensor) -> None:
    if g_rows is not None:
        check_tensor("g_rows", g_rows, 1, torch.int64)
        check(g_rows.shape[0] == b_rows.shape[0], "g_rows and row table disagree on slots")


def _expand_with_g(ref: Callable, g_rows: torch.Tensor | None,
                   token_slots: Callable[[], torch.Tensor], pool_flat: torch.Tensor,
                   out: torch.Tensor, *args: torch.Tensor) -> None:
    """Run `ref`'s twin (DoRA's g fused into its epilogue) or `ref` then `dora_scale`."""
    fn = pick(ref, out.device)
    if g_rows is None:
        fn(*args, out)
    elif fn is ref:
        fn(*args, out)
        dora_scale(out, pool_flat, g_rows, token_slots())
    else:
        fn(*args, out, g_rows=g_rows)


def lora_expand(h: torch.Tensor, pool_flat: torch.Tensor, b_rows: torch.Tensor,
                ranks: torch.Tensor, scales: torch.Tensor, token_slots: torch.Tensor,
                out: torch.Tensor, g_rows: torch.Tensor | None = None) -> None:
    """Checked entry point of `lora_expand_ref` (same semantics; `out` written in place).

    With DoRA's g_rows [S] int64 (-1: not DoRA), `dora_scale` follows on the same tokens; the
    Triton twin applies it in the expand epilogue (no extra pass over `out`).
    """
    _check_expand(h, pool_flat, b_rows, ranks, scales, out)
    check_tensor("token_slots", token_slots, 1, INDEX_DTYPES)
    check(token_slots.shape[0] == out.shape[0], "token_slots and out disagree on tokens")
    _check_g_rows(g_rows, b_rows)
    if out.shape[0] == 0 or b_rows.shape[1] == 0 or out.shape[1] == 0:
        if g_rows is not None:
            dora_scale(out, pool_flat, g_rows, token_slots)
        return
    _expand_with_g(lora_expand_ref, g_rows, lambda: token_slots, pool_flat, out, h, pool_flat,
                   b_rows, ranks, scales, token_slots)


def lora_shrink_segments(x: torch.Tensor, pool_flat: torch.Tensor, a_rows: torch.Tensor,
                         ranks: torch.Tensor, seg_starts: torch.Tensor,
                         seg_slots: torch.Tensor) -> torch.Tensor:
    """Checked entry point of `lora_shrink_segments_ref` (prefill form)."""
    check_tensor("x", x, 2, pool_flat.dtype)
    _check_tables(pool_flat, a_rows, ranks)
    _check_segments(seg_starts, seg_slots, x.shape[0])
    if x.shape[0] == 0 or a_rows.shape[1] == 0 or seg_slots.shape[0] == 0:
        return torch.zeros((x.shape[0], a_rows.shape[1]), dtype=torch.float32, device=x.device)
    ref = lora_shrink_segments_ref
    return pick(ref, x.device)(x, pool_flat, a_rows, ranks, seg_starts, seg_slots)


def lora_expand_segments(h: torch.Tensor, pool_flat: torch.Tensor, b_rows: torch.Tensor,
                         ranks: torch.Tensor, scales: torch.Tensor, seg_starts: torch.Tensor,
                         seg_slots: torch.Tensor, out: torch.Tensor,
                         g_rows: torch.Tensor | None = None) -> None:
    """Checked entry point of `lora_expand_segments_ref` (prefill form; `out` in place).

    Optional DoRA g_rows [S] as in `lora_expand`.
    """
    _check_expand(h, pool_flat, b_rows, ranks, scales, out)
    _check_segments(seg_starts, seg_slots, out.shape[0])
    _check_g_rows(g_rows, b_rows)
    if out.shape[0] == 0 or seg_slots.shape[0] == 0:
        return
    if b_rows.shape[1] == 0 or out.shape[1] == 0:
        if g_rows is not None:
            dora_scale(out, pool_flat, g_rows,
                       segments_to_token_slots(seg_starts, seg_slots, out.shape[0]))
        return
    _expand_with_g(lora_expand_segments_ref, g_rows,
                   lambda: segments_to_token_slots(seg_starts, seg_slots, out.shape[0]),
                   pool_flat, out, h, pool_flat, b_rows, ranks, scales, seg_starts, seg_slots)
