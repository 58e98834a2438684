"""SHiRA's unfused path: `y += scale · S x` with S sparse, values and positions read from the pool.

Non-zero k of a slot lives at element k % W of its row k // W, W = d_in + d_out (value rows in
the pool dtype, position rows int32 = row * d_in + col). Imports only `kernels.dispatch`, `lora`.
"""

from __future__ import annotations

import torch

from loraplex.kernels.dispatch import INDEX_DTYPES, check, check_same_device, check_tensor, pick
from loraplex.kernels.lora import gather_rows, group_tokens


def shira_gather_ref(x: torch.Tensor, pool_flat: torch.Tensor, pool_i32: torch.Tensor,
                     value_rows: torch.Tensor, index_rows: torch.Tensor, nnz: torch.Tensor,
                     scales: torch.Tensor, token_slots: torch.Tensor, out: torch.Tensor) -> None:
    """Semantics:  for each token t with s = token_slots[t] >= 0, for k < nnz[s]:
                    v, p = pool_flat[value_rows[s, k//W] + k%W], pool_i32[index_rows[s, k//W] + k%W]
                    out[t, p // d_in] += scales[s] * v * x[t, p % d_in]   (fp32, duplicates add)
    x: [T, d_in] pool dtype; pool_flat: [numel] pool dtype; pool_i32: [numel'] int32 (same bytes);
    value_rows, index_rows: [S, R] int64 (index_rows in int32 units); nnz: [S] int32/int64;
    scales: [S] float32; token_slots: [T] int64; out: [T, d_out] pool dtype, written in place.
    """
    d_in, d_out = x.shape[1], out.shape[1]
    width = d_in + d_out
    groups = group_tokens(token_slots)
    if groups is None:
        return
    slots = groups.chunk_slots  # [N]
    num_chunks, max_rows = slots.shape[0], value_rows.shape[1]
    row_counts = -(-nnz[slots].long() // width)  # [N] rows holding the non-zeros
    values = gather_rows(pool_flat, value_rows[slots], row_counts, width).flatten(1)  # [N, R*W]
    keep_rows = torch.arange(max_rows, device=slots.device) < row_counts[:, None]
    index_offsets = torch.where(keep_rows, index_rows[slots], 0)  # [N, R]
    positions = pool_i32.unfold(0, width, 1).index_select(0, index_offsets.flatten())
    positions = positions.view(num_chunks, -1).long()  # [N, R*W]
    keep = torch.arange(max_rows * width, device=slots.device) < nnz[slots][:, None]
    chunk, k = torch.nonzero(keep, as_tuple=True)  # the live non-zeros, [K] each
    weights = values[chunk, k] * scales[slots].float()[chunk]  # [K]
    position = positions[chunk, k]
    # One block-diagonal sparse matrix for all chunks: chunk c maps its d_in block to its d_out
    # block; COO sums duplicated positions, as SHiRA's dense S would. Invariant checks turn a
    # corrupt position into an error instead of a wild write.
    sparse = torch.sparse_coo_tensor(
        torch.stack([chunk * d_out + position // d_in, chunk * d_in + position % d_in]),
        weights, (num_chunks * d_out, num_chunks * d_in), check_invariants=True)
    x_pad = groups.pad(x.float())  # [N, width_tokens, d_in]
    x_cols = x_pad.transpose(1, 2).reshape(num_chunks * d_in, groups.width)
    y = torch.sparse.mm(sparse, x_cols).view(num_chunks, d_out, groups.width)
    delta = groups.unpad(y.transpose(1, 2))  # [V, d_out]
    rows = groups.tokens
    out[rows] = (out[rows].float() + delta).to(out.dtype)


def shira_gather(x: torch.Tensor, pool_flat: torch.Tensor, pool_i32: torch.Tensor,
                 value_rows: torch.Tensor, index_rows: torch.Tensor, nnz: torch.Tensor,
                 scales: torch.Tensor, token_slots: torch.Tensor, out: torch.Tensor) -> None:
    """Checked entry point of `shira_gather_ref` (same semantics; `out` written in place)."""
    check_tensor("x", x, 2, pool_flat.dtype)
    check_tensor("out", out, 2, pool_flat.dtype)
    check_tensor("pool_flat", pool_flat, 1)
    check_tensor("pool_i32", pool_i32, 1, torch.int32)
    check_tensor("value_rows", value_rows, 2, torch.int64)
    check_tensor("index_rows", index_rows, 2, torch.int64)
    check(value_rows.shape == index_rows.shape, "value_rows and index_rows differ in shape")
    check_tensor("nnz", nnz, 1, INDEX_DTYPES)
    check_tensor("scales", scales, 1, torch.float32)
    check(nnz.shape[0] == scales.shape[0] == value_rows.shape[0], "tables disagree on slots")
    check_tensor("token_slots", token_slots, 1, INDEX_DTYPES)
    check(token_slots.shape[0] == x.shape[0] == out.shape[0], "x, out, token_slots: tokens")
    check_same_device(x=x, pool_flat=pool_flat, pool_i32=pool_i32, out=out)
    if x.shape[0] == 0 or value_rows.shape[1] == 0 or out.shape[1] == 0:
        return
    pick(shira_gather_ref, x.device)(x, pool_flat, pool_i32, value_rows, index_rows, nnz,
                                     scales, token_slots, out)
