"""Paged attention over K/V pages of the pool (prefill, chunked prefill and decode in one call).

Torch references plus the public entry points for the K/V write and the attention itself.
Imports only `kernels.dispatch`.
"""

from __future__ import annotations

import torch

from loraplex.kernels.dispatch import INDEX_DTYPES, check, check_same_device, check_tensor, pick


def write_kv_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Semantics:  for each token t with p = slot_mapping[t] >= 0:
                    k_cache[p // page_size, p % page_size] = k[t]
                    v_cache[p // page_size, p % page_size] = v[t]
    k_cache, v_cache: [num_pages, page_size, H_kv, D], written in place (strided views are fine);
    k, v: [T, H_kv, D]; slot_mapping: [T] int64 (page * page_size + offset; -1: skip).
    """
    page_size = k_cache.shape[1]
    tokens = torch.nonzero(slot_mapping >= 0).squeeze(1)  # [V]
    slots = slot_mapping[tokens].long()
    pages, offsets = slots // page_size, slots % page_size
    k_cache[pages, offsets] = k[tokens].to(k_cache.dtype)
    v_cache[pages, offsets] = v[tokens].to(v_cache.dtype)


def _gather_context(cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                    max_context: int) -> torch.Tensor:
    """[B, H_kv, max_context, D] copy of each sequence's K or V, read page by page.

    Positions past a context are read from its last page or from page 0 (padded table entries
    are never used as page numbers); callers mask them.
    """
    num_seqs, page_size = block_tables.shape[0], cache.shape[1]
    num_pages = -(-max_context // page_size)
    live = torch.arange(num_pages, device=cache.device) < -(-context_lens[:, None] // page_size)
    pages = torch.where(live, block_tables[:, :num_pages].long(), 0)  # [B, num_pages]
    # [B * num_pages, page_size, H_kv, D]: index_select copies whole pages of a strided view.
    context = cache.index_select(0, pages.flatten())
    context = context.view(num_seqs, num_pages * page_size, *cache.shape[2:])[:, :max_context]
    return context.transpose(1, 2).float()


def _attend(q: torch.Tensor, seq: torch.Tensor, index: torch.Tensor, k_cache: torch.Tensor,
            v_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
            q_lens: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Attention of tokens q [Tb, H_q, D] of sequences seq [Tb] (query `index` within each),
    all padded to the longest query count and context among these B sequences → [Tb, H_q, D] fp32.
    """
    num_seqs, num_heads, head_dim = context_lens.shape[0], q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_queries, max_context = int(q_lens.max()), int(context_lens.max())
    if max_context == 0:  # pad sequences only (CUDA-graph padding): no key, zeros
        return q.new_zeros(q.shape, dtype=torch.float32)
    q_pad = q.new_zeros(num_seqs, max_queries, num_heads, head_dim, dtype=torch.float32)
    q_pad[seq, index] = q.float()
    # [B, H_kv, group * Nq, D]: query head h = kv * group + g attends kv head h // group.
    q_pad = q_pad.view(num_seqs, max_queries, num_kv_heads, group, head_dim)
    q_pad = q_pad.permute(0, 2, 3, 1, 4).reshape(num_seqs, num_kv_heads, -1, head_dim)
    keys = _gather_context(k_cache, block_tables, context_lens, max_context)  # [B, H_kv, L, D]
    values = _gather_context(v_cache, block_tables, context_lens, max_context)
    key_pos = torch.arange(max_context, device=q.device)
    values.masked_fill_((key_pos >= context_lens[:, None])[:, None, :, None], 0.0)  # 0·NaN
    scores = q_pad @ keys.transpose(2, 3) * sm_scale  # [B, H_kv, group * Nq, L]

    # Query i of sequence b sits at context position ctx_b - n_b + i (padded rows: discarded).
    positions = context_lens[:, None] - q_lens[:, None] + torch.arange(max_queries,
                                                                       device=q.device)  # [B, Nq]
    allowed = key_pos[None, None, :] <= positions[:, :, None]  # [B, Nq, L], causal
    allowed = allowed[:, None].expand(-1, group, -1, -1).reshape(num_seqs, 1, -1, max_context)
    probs = torch.softmax(scores.masked_fill_(~allowed, float("-inf")), dim=-1)
    attn = probs @ values  # [B, H_kv, group * Nq, D]
    attn = attn.view(num_seqs, num_kv_heads, group, max_queries, head_dim)
    attn = attn.permute(0, 3, 1, 2, 4).reshape(num_seqs, max_queries, num_heads, head_dim)
    return attn[seq, index]


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor,
                        query_start_loc: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Semantics:  for sequence b, its n_b queries t are context positions p = ctx_b - n_b + i:
                    K, V = context b's first p + 1 keys/values from its pages (GQA: h // (H_q/H_kv))
                    out[t, h] = softmax(sm_scale * q[t, h] @ K.T, fp32) @ V
                (a sequence with no key at all, as a pad of a padded step, gets zeros)
    q: [T, H_q, D]; k_cache, v_cache: [num_pages, page_size, H_kv, D] (strided views are fine);
    block_tables: [B, max_pages] int32/int64 (padded); context_lens: [B] int32/int64;
    query_start_loc: [B+1] int32/int64 (0 … T) → out: [T, H_q, D] in q.dtype (new).
    """
    num_tokens, num_seqs = q.shape[0], context_lens.shape[0]
    out = torch.zeros_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    starts, ctx_lens = query_start_loc.long(), context_lens.long()
    q_lens = starts[1:] - starts[:-1]  # [B]
    seq = torch.repeat_interleave(torch.arange(num_seqs, device=q.device), q_lens,
                                  output_size=num_tokens)  # [T]
    index = torch.arange(num_tokens, device=q.device) - starts[seq]  # [T] within its queries
    # Sequences are padded to the longest query count of their class (decode, 2, 3-4, 5-8, …),
    # so one long prefill does not pad every decode: a loop over ≤ log2(T) + 1 classes.
    size_class = torch.ceil(torch.log2(q_lens.clamp(min=1).double())).long()  # [B]
    local = torch.empty_like(size_class)
    for cls in torch.unique(size_class[q_lens > 0]).tolist():
        seqs = torch.nonzero(size_class == cls).squeeze(1)  # [Bc]
        local[seqs] = torch.arange(seqs.shape[0], device=q.device)
        tokens = torch.nonzero(size_class[seq] == cls).squeeze(1)  # [Tc]
        out[tokens] = _attend(q[tokens], local[seq[tokens]], index[tokens], k_cache, v_cache,
                              block_tables[seqs], ctx_lens[seqs], q_lens[seqs],
                              sm_scale).to(q.dtype)
    return out


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Checked entry point of `write_kv_ref` (same semantics; caches written in place)."""
    check_tensor("k_cache", k_cache, 4)
    check(v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype,
          "k_cache and v_cache differ in shape or dtype")
    check_tensor("k", k, 3, k_cache.dtype)
    check(v.shape == k.shape and v.dtype == k.dtype, "k and v differ in shape or dtype")
    check(k.shape[1:] == k_cache.shape[2:],
          lambda: f"k {tuple(k.shape)} vs cache {tuple(k_cache.shape)}")
    check_tensor("slot_mapping", slot_mapping, 1, INDEX_DTYPES)
    check(slot_mapping.shape[0] == k.shape[0], "slot_mapping and k disagree on tokens")
    check_same_device(k_cache=k_cache, k=k, slot_mapping=slot_mapping)
    if k.shape[0] == 0:
        return
    pick(write_kv_ref, k.device)(k_cache, v_cache, k, v, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Checked entry point of `paged_attention_ref` (same semantics)."""
    check_tensor("q", q, 3, k_cache.dtype)
    check_tensor("k_cache", k_cache, 4)
    check(v_cache.shape == k_cache.shape, "k_cache and v_cache differ in shape")
    check(q.shape[2] == k_cache.shape[3],
          lambda: f"head_dim: q {q.shape[2]} vs cache {k_cache.shape[3]}")
    check(q.shape[1] % k_cache.shape[2] == 0,
          lambda: f"{q.shape[1]} query heads not a multiple of {k_cache.shape[2]} kv heads")
    check_tensor("block_tables", block_tables, 2, INDEX_DTYPES)
    check_tensor("context_lens", context_lens, 1, INDEX_DTYPES)
    check_tensor("query_start_loc", query_start_loc, 1, INDEX_DTYPES)
    num_seqs = context_lens.shape[0]
    check(block_tables.shape[0] == num_seqs and query_start_loc.shape[0] == num_seqs + 1,
          "block_tables [B, …], context_lens [B] and query_start_loc [B+1] disagree on B")
    check_same_device(q=q, k_cache=k_cache, block_tables=block_tables, context_lens=context_lens)
    if q.shape[0] == 0 or num_seqs == 0:
        return torch.zeros_like(q)
    return pick(paged_attention_ref, q.device)(q, k_cache, v_cache, block_tables, context_lens,
                                               query_start_loc, sm_scale)
