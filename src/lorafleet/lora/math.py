"""Pure multi-LoRA tensor math: every row of a batch uses its own adapter.

    y = x W^T  +  scale[s] * (x A[s]^T) B[s]^T        s = slot of the row (or no adapter)

          x ──► base W ─────────────────────────┐
          │                                     ▼
          └──► A[s] (r×k) ──► B[s] (d×r) ──► × scale[s] ──► (+) ──► y

The adapters of one batch are stacked into a table (slot S, padded to the largest rank R;
zero rows/columns add nothing and receive zero gradient), then gathered per row so the whole
batch goes through two batched matmuls per module, whatever mix of adapters it holds. No
device moves, no I/O, no globals here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def stack_table(
    pairs: list[tuple[Tensor, Tensor] | None], scales: list[float], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Stack (A [r, K], B [D, r]) pairs into a_SRK, b_SDR with the scale folded into B.

    `None` entries (an adapter that does not target this module) become zero slots. The
    result is differentiable with respect to every A and B given. At least one pair must be
    present (it fixes K and D).
    """
    present = [p for p in pairs if p is not None]
    rank = max(a.shape[0] for a, _ in present)
    k_in, d_out = present[0][0].shape[1], present[0][1].shape[0]
    device = present[0][0].device
    a_rows: list[Tensor] = []
    b_rows: list[Tensor] = []
    for pair, scale in zip(pairs, scales):
        if pair is None:
            a_rows.append(torch.zeros(rank, k_in, dtype=dtype, device=device))
            b_rows.append(torch.zeros(d_out, rank, dtype=dtype, device=device))
            continue
        a, b = pair
        r = a.shape[0]
        a = a.to(dtype)
        b = b.to(dtype) * scale
        if r < rank:
            a = torch.cat([a, a.new_zeros(rank - r, k_in)])
            b = torch.cat([b, b.new_zeros(d_out, rank - r)], dim=1)
        a_rows.append(a)
        b_rows.append(b)
    return torch.stack(a_rows), torch.stack(b_rows)


def stack_expert_table(
    pairs: list[tuple[Tensor, Tensor] | None], scales: list[float], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Stack packed expert pairs (A [E, r, K], B [E, D, r]) into a_SERK, b_SEDR, scale folded into B.

    The expert twin of `stack_table`: `None` slots are zeros, ranks are zero-padded to the largest.
    """
    present = [p for p in pairs if p is not None]
    n_exp, k_in, d_out = present[0][0].shape[0], present[0][0].shape[2], present[0][1].shape[1]
    rank = max(a.shape[1] for a, _ in present)
    device = present[0][0].device
    a_rows: list[Tensor] = []
    b_rows: list[Tensor] = []
    for pair, scale in zip(pairs, scales):
        if pair is None:
            a_rows.append(torch.zeros(n_exp, rank, k_in, dtype=dtype, device=device))
            b_rows.append(torch.zeros(n_exp, d_out, rank, dtype=dtype, device=device))
            continue
        a, b = pair[0].to(dtype), pair[1].to(dtype) * scale
        r = a.shape[1]
        if r < rank:
            a = torch.cat([a, a.new_zeros(n_exp, rank - r, k_in)], dim=1)
            b = torch.cat([b, b.new_zeros(n_exp, d_out, rank - r)], dim=2)
        a_rows.append(a)
        b_rows.append(b)
    return torch.stack(a_rows), torch.stack(b_rows)


def gather_rows(a_SRK: Tensor, b_SDR: Tensor, slot_B: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row operands for `apply_lora`: aT_BKR = A[slot]^T, bT_BRD = B[slot]^T."""
    return a_SRK[slot_B].transpose(1, 2), b_SDR[slot_B].transpose(1, 2)


def apply_lora(y_BTD: Tensor, x_BTK: Tensor, aT_BKR: Tensor, bT_BRD: Tensor) -> Tensor:
    """Return y + (x A^T) B^T per row, in two batched matmuls (scale already folded into B)."""
    h_BTR = torch.bmm(x_BTK, aT_BKR)
    return torch.baddbmm(y_BTD, h_BTR, bT_BRD)


def apply_lora_reference(
    y_BTD: Tensor, x_BTK: Tensor, pairs: list[tuple[Tensor, Tensor] | None],
    scales: list[float], slot_B: list[int],
) -> Tensor:
    """The obviously correct version: loop over rows, one adapter at a time. For tests."""
    out = y_BTD.clone()
    for row, s in enumerate(slot_B):
        if s < 0 or pairs[s] is None:
            continue
        a, b = pairs[s]
        out[row] = out[row] + scales[s] * (x_BTK[row] @ a.T.to(x_BTK.dtype)) @ b.T.to(x_BTK.dtype)
    return out
