"""DoRA's epilogue: scale each output row by the adapter's constant `g`, read from the pool.

Torch reference plus the public entry point. Imports only `kernels.dispatch`.
"""

from __future__ import annotations

import torch

from loraplex.kernels.dispatch import INDEX_DTYPES, check, check_same_device, check_tensor, pick


def dora_scale_ref(out: torch.Tensor, pool_flat: torch.Tensor, g_rows: torch.Tensor,
                   token_slots: torch.Tensor) -> None:
    """Semantics:  for each token t with s = token_slots[t] >= 0 and g_rows[s] >= 0:
                    g = pool_flat[g_rows[s] : g_rows[s] + d_out]
                    out[t] = (out[t].float() * g.float()).to(out.dtype)
    out: [T, d_out] pool dtype, written in place (may be a column slice);
    pool_flat: [numel] pool dtype; g_rows: [S] int64 (-1: slot s is not DoRA here);
    token_slots: [T] int64 (-1: no adapter).
    """
    d_out = out.shape[1]
    safe_slots = token_slots.long().clamp(min=0)
    needs = (token_slots >= 0) & (g_rows[safe_slots] >= 0)  # [T]
    tokens = torch.nonzero(needs).squeeze(1)  # [V]
    if tokens.shape[0] == 0:
        return
    slots, inverse = torch.unique(token_slots[tokens].long(), return_inverse=True)  # [U], [V]
    windows = pool_flat.unfold(0, d_out, 1)  # [numel - d_out + 1, d_out], a view
    g = windows.index_select(0, g_rows[slots]).float()  # [U, d_out], each distinct slot read once
    out[tokens] = (out[tokens].float() * g[inverse]).to(out.dtype)


def dora_scale(out: torch.Tensor, pool_flat: torch.Tensor, g_rows: torch.Tensor,
               token_slots: torch.Tensor) -> None:
    """Checked entry point of `dora_scale_ref` (same semantics; `out` written in place)."""
    check_tensor("out", out, 2, pool_flat.dtype)
    check_tensor("pool_flat", pool_flat, 1)
    check_tensor("g_rows", g_rows, 1, torch.int64)
    check_tensor("token_slots", token_slots, 1, INDEX_DTYPES)
    check(token_slots.shape[0] == out.shape[0], "token_slots and out disagree on tokens")
    check_same_device(out=out, pool_flat=pool_flat, g_rows=g_rows, token_slots=token_slots)
    if out.shape[0] == 0 or out.shape[1] == 0 or g_rows.shape[0] == 0:
        return
    pick(dora_scale_ref, out.device)(out, pool_flat, g_rows, token_slots)
