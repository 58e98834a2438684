"""Triton twins of `write_kv_ref` and `paged_attention_ref` (prefill, chunked prefill and decode).

Attention: one program per (block of queries of one sequence, KV head) holds the queries of all
the head's GQA group as the rows of one tile and walks the context's keys through the block
table with an fp32 online softmax (FlashAttention's recurrence). Decode steps take one program
per sequence and split its keys in shares (flash-decoding), so that a small batch still fills
the GPU; a second launch combines the shares. Imports triton; loaded only by `kernels.dispatch`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from loraplex.kernels.dispatch import memoized
from loraplex.kernels.lora_triton_common import num_sms
from loraplex.kernels.tuning import Launch, launch


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, page_size, num_kv_heads,
                     head_dim, stride_kt, stride_kh, stride_vt, stride_vh, stride_c0, stride_c1,
                     stride_c2, stride_c3, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token t's K and V rows ([H_kv, D]) into page slot // page_size, offset slot % page_size."""
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        slot = slot.to(tl.int64)  # page · stride passes 2³¹ in a real pool
        page, offset = slot // page_size, slot % page_size
        heads, dims = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_D)
        mask = (heads < num_kv_heads)[:, None] & (dims < head_dim)[None, :]
        dst = page * stride_c0 + offset * stride_c1 + heads[:, None] * stride_c2 \
            + dims[None, :] * stride_c3
        k = tl.load(k_ptr + t * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
        v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Triton twin of `write_kv_ref` (same semantics and signature; caches in place)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k_cache.stride() == v_cache.stride(), "k_cache and v_cache views must share strides"
    k = k if k.stride(2) == 1 else k.contiguous()
    v = v if v.stride(2) == 1 else v.contiguous()
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k_cache.shape[1], num_kv_heads, head_dim,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), *k_cache.stride(),
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4)


@triton.jit
def _attend_block(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, m_ptr, l_ptr, b, j,
                  kv_head, split, q_start, num_queries, context_len, qk_scale, page_size,
                  head_dim, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_c0,
                  stride_c1, stride_c2, stride_os, stride_ms, stride_mt,
                  GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Query block j of sequence b (BLOCK_M queries × GROUP heads) against one KV head's keys;
    with SPLITS > 1 only this split's share of them, written unnormalised with its max and sum."""
    # Row i of the tile: query j·BLOCK_M + i // BLOCK_G, head kv_head·GROUP + i % BLOCK_G.
    rows = tl.arange(0, BLOCK_M * BLOCK_G)
    query = j * BLOCK_M + rows // BLOCK_G
    head = kv_head * GROUP + rows % BLOCK_G
    row_mask = (query < num_queries) & (rows % BLOCK_G < GROUP)
    position = context_len - num_queries + query  # causal limit of each row
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    tile_mask = row_mask[:, None] & dim_mask[None, :]
    q = tl.load(q_ptr + (q_start + query)[:, None] * stride_qt + head[:, None] * stride_qh
                + dims[None, :], mask=tile_mask, other=0.0)
    m_i = tl.full([BLOCK_M * BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M * BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M * BLOCK_G, BLOCK_D], dtype=tl.float32)
    last_query = tl.minimum((j + 1) * BLOCK_M, num_queries) - 1
    num_keys = tl.minimum(context_len, context_len - num_queries + last_query + 1)
    lo, hi = 0, num_keys
    if SPLITS > 1:  # equal shares in whole key blocks; a share past the keys is empty
        share = tl.cdiv(tl.cdiv(num_keys, SPLITS), BLOCK_N) * BLOCK_N
        lo = split * share
        hi = tl.minimum(lo + share, num_keys)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_mask = keys < hi
        page = tl.load(block_tables_ptr + b * stride_bt + keys // page_size, mask=key_mask,
                       other=0).to(tl.int64)  # page · stride passes 2³¹ in a real pool
        kv_off = page * stride_c0 + (keys % page_size) * stride_c1 + kv_head * stride_c2
        kv_mask = key_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 units
        allowed = (keys[None, :] <= position[:, None]) & key_mask[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        alpha = tl.exp2(m_i - m_safe)
        probs = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(probs, axis=1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    tokens = q_start + query
    if SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + tokens[:, None] * stride_ot + head[:, None] * stride_oh
                 + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=tile_mask)
    else:  # out_ptr: fp32 partials [SPLITS, T, H_q, D]; m, l: [SPLITS, T, H_q]
        tl.store(out_ptr + split * stride_os + tokens[:, None] * stride_ot
                 + head[:, None] * stride_oh + dims[None, :], acc, mask=tile_mask)
        ml = split * stride_ms + tokens * stride_mt + head
        tl.store(m_ptr + ml, m_i, mask=row_mask)
        tl.store(l_ptr + ml, l_i, mask=row_mask)


@triton.jit
def _attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr,
                      context_lens_ptr, query_start_ptr, block_seq_ptr, block_first_ptr, m_ptr,
                      l_ptr, qk_scale, num_seqs, page_size, head_dim, stride_qt, stride_qh,
                      stride_ot, stride_oh, stride_bt, stride_c0, stride_c1, stride_c2,
                      stride_os, stride_ms, stride_mt,
                      GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
                      PER_SEQUENCE: tl.constexpr, PRECISION: tl.constexpr):
    """Program (p, KV head, split). PER_SEQUENCE: p is sequence p, which walks its own query
    blocks (decode: one; no block map to build); else p is one query block (`_query_blocks`)."""
    p, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if PER_SEQUENCE:
        b, j_first = p, 0
    else:
        b = tl.load(block_seq_ptr + p)
        j_first = p - tl.load(block_first_ptr + tl.minimum(b, num_seqs - 1))
    if b < num_seqs:
        q_start = tl.load(query_start_ptr + b)
        num_queries = tl.load(query_start_ptr + b + 1) - q_start
        context_len = tl.load(context_lens_ptr + b)
        if PER_SEQUENCE:
            j_end = tl.cdiv(num_queries, BLOCK_M)
        else:
            j_end = j_first + 1
        for j in range(j_first, j_end):
            _attend_block(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, m_ptr,
                          l_ptr, b, j, kv_head, split, q_start, num_queries, context_len,
                          qk_scale, page_size, head_dim, stride_qt, stride_qh, stride_ot,
                          stride_oh, stride_bt, stride_c0, stride_c1, stride_c2, stride_os,
                          stride_ms, stride_mt, GROUP, BLOCK_G, BLOCK_M, BLOCK_N, BLOCK_D,
                          SPLITS, PRECISION)


@triton.jit
def _combine_kernel(part_ptr, m_ptr, l_ptr, out_ptr, num_heads, head_dim, stride_ps, stride_pt,
                    stride_ph, stride_ms, stride_mt, stride_ot, stride_oh,
                    SPLITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t, heads] from the SPLITS partial (acc, max, sum) of token t (flash-decoding's reduce):
    each share weighted by exp2(its max − the overall max); a row with no key gives 0."""
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    head_mask = heads < num_heads
    mask = head_mask[:, None] & (dims < head_dim)[None, :]
    ml = t * stride_mt + heads
    m_max = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    for s in range(SPLITS):
        m_max = tl.maximum(m_max, tl.load(m_ptr + s * stride_ms + ml, mask=head_mask,
                                          other=float("-inf")))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for s in range(SPLITS):
        w = tl.exp2(tl.load(m_ptr + s * stride_ms + ml, mask=head_mask, other=float("-inf"))
                    - m_safe)
        l_sum += w * tl.load(l_ptr + s * stride_ms + ml, mask=head_mask, other=0.0)
        part = tl.load(part_ptr + s * stride_ps + t * stride_pt + heads[:, None] * stride_ph
                       + dims[None, :], mask=mask, other=0.0)
        acc += w[:, None] * part
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    tl.store(out_ptr + t * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


def _query_blocks(query_start_loc: torch.Tensor, num_tokens: int,
                  block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sequence of each program, first program of each sequence, number of programs).

    cdiv(T, BLOCK_M) + B programs bound Σ cdiv(n_b, BLOCK_M) without a host sync.
    """
    starts = query_start_loc.long()
    num_blocks = (starts[1:] - starts[:-1] + block_m - 1) // block_m
    block_end = torch.cumsum(num_blocks, 0)
    grid = triton.cdiv(num_tokens, block_m) + num_blocks.shape[0]
    programs = torch.arange(grid, device=starts.device)
    return torch.searchsorted(block_end, programs, right=True), block_end - num_blocks, grid


MAX_SPLITS = 16


def decode_splits(num_seqs: int, num_kv_heads: int, key_capacity: int, block_n: int,
                  device: torch.device) -> int:
    """Key splits for a decode step (flash-decoding): double them while the grid is under
    `attention_programs_per_sm` (`tuning.launch`) per SM and each split still spans a key block
    of the tables' capacity.

    Depends only on shapes (the same for every replay of a CUDA graph); a split past a
    context's keys reads nothing and costs one idle program.
    """
    programs, splits = num_seqs * num_kv_heads, 1
    per_sm = launch(device).attention_programs_per_sm
    while (programs * splits < per_sm * num_sms(device) and splits < MAX_SPLITS
           and 2 * splits * block_n <= key_capacity):
        splits *= 2
    return splits


def attention_into(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                   query_start_loc: torch.Tensor, sm_scale: float, block_n: int | None = None,
                   rows: int | None = None, num_warps: int | None = None,
                   splits: int | None = None) -> None:
    """paged_attention_ref's result written into out [T, H_q, D] (every query row is written).

    Decode steps (T == B, one query per sequence) run one program per sequence and KV head,
    with the keys split in `splits` shares (None: `decode_splits`) whose partial results a
    second launch combines; other steps map query blocks to programs (`_query_blocks`) and
    split only when asked. block_n, num_warps: None takes `tuning.launch`'s for decode steps,
    64 keys and 4 warps for the others.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, num_kv_heads = context_lens.shape[0], k_cache.shape[2]
    if num_tokens == 0 or num_seqs == 0:
        return
    assert k_cache.stride() == v_cache.stride(), "k_cache and v_cache views must share strides"
    assert k_cache.stride(3) == 1 and q.stride(2) == 1 and out.stride(2) == 1, "head_dim strided"
    group = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(group)
    # T == B: one program per sequence (it loops over its query blocks, so any split of the T
    # queries among the B sequences is right; decode has one each). The tile needs 16 rows.
    per_sequence = num_tokens == num_seqs
    rows = rows or (16 if per_sequence else 64)
    block_m = max(1, rows // block_g)
    tuned = launch(q.device) if per_sequence else Launch()
    block_n, num_warps = block_n or tuned.attention_block_n, num_warps or tuned.attention_warps
    if per_sequence:
        block_seq = block_first = context_lens  # unused
        grid = num_seqs
        if splits is None:
            splits = decode_splits(num_seqs, num_kv_heads,
                                   block_tables.shape[1] * k_cache.shape[1], block_n, q.device)
    else:  # the same for every layer of a step: derived once per step memo
        block_seq, block_first, grid = memoized(
            "attention_query_blocks", query_start_loc, (num_tokens, block_m),
            lambda: _query_blocks(query_start_loc, num_tokens, block_m))
    splits = splits or 1
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    block_tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    target, row_max, row_sum = out, out, out
    if splits > 1:  # fp32 partials of every token, written in full by the split programs
        target = torch.empty((splits, num_tokens, num_heads, head_dim), dtype=torch.float32,
                             device=q.device)
        row_max = torch.empty((splits, num_tokens, num_heads), dtype=torch.float32,
                              device=q.device)
        row_sum = torch.empty_like(row_max)
    stride_os = target.stride(0) if splits > 1 else 0
    stride_ms, stride_mt = (row_max.stride(0), row_max.stride(1)) if splits > 1 else (0, 0)
    block_d = max(16, triton.next_power_of_2(head_dim))
    _attention_kernel[(grid, num_kv_heads, splits)](
        q, k_cache, v_cache, target, block_tables, context_lens, query_start_loc, block_seq,
        block_first, row_max, row_sum, sm_scale * math.log2(math.e), num_seqs, k_cache.shape[1],
        head_dim, q.stride(0), q.stride(1), target.stride(-3), target.stride(-2),
        block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        stride_os, stride_ms, stride_mt, GROUP=group, BLOCK_G=block_g, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_D=block_d, SPLITS=splits, PER_SEQUENCE=per_sequence,
        PRECISION=precision, num_warps=num_warps)
    if splits > 1:
        block_h = min(triton.next_power_of_2(num_heads), max(1, 4096 // block_d))
        _combine_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
            target, row_max, row_sum, out, num_heads, head_dim, target.stride(0),
            target.stride(1), target.stride(2), stride_ms, stride_mt, out.stride(0), out.stride(1),
            SPLITS=splits, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4)


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           query_start_loc: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Triton twin of `paged_attention_ref` (same semantics and signature)."""
    q = q if q.stride(2) == 1 else q.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # every row is written
    attention_into(out, q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                   sm_scale)
    return out
