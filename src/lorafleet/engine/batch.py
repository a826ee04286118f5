"""Pure batch assembly: adapters per row in, LoRA operands and padded token tensors out."""

from __future__ import annotations

import torch
from torch import Tensor

from lorafleet.lora.layers import RowOperands
from lorafleet.lora.math import gather_rows, stack_expert_table, stack_table
from lorafleet.lora.weights import LoraWeights


def row_operands(slots: list[LoraWeights | None], slot_B: Tensor, dtype: torch.dtype) -> RowOperands:
    """For every module any slot targets: (aT_BKR, bT_BRD) gathered for the rows.

    `slots[s]` is the adapter of slot s (None: no adapter, the base alone); `slot_B` gives
    each row's slot. Differentiable with respect to the adapters' tensors. Routed-expert
    paths (packed 3-D pairs) get their slot tables instead: (a_SERK, b_SEDR, slot_B).
    """
    paths: dict[str, None] = {}
    for w in slots:
        if w is not None:
            paths.update(dict.fromkeys(w.pairs))
    scales = [w.spec.scale if w is not None else 0.0 for w in slots]
    operands: RowOperands = {}
    for path in paths:
        pairs = [w.pairs.get(path) if w is not None else None for w in slots]
        if next(p for p in pairs if p is not None)[0].ndim == 3:
            a_SERK, b_SEDR = stack_expert_table(pairs, scales, dtype)
            operands[path] = (a_SERK, b_SEDR, slot_B)
            continue
        a_SRK, b_SDR = stack_table(pairs, scales, dtype)
        operands[path] = gather_rows(a_SRK, b_SDR, slot_B)
    return operands


def select_rows(operands: RowOperands, keep_B: Tensor) -> RowOperands:
    """The operands of a subset of rows (finished rows leave a decode batch)."""
    return {p: (ops[0], ops[1], ops[2][keep_B]) if len(ops) == 3 else (ops[0][keep_B], ops[1][keep_B])
            for p, ops in operands.items()}


def right_pad(seqs: list[Tensor], pad: int) -> Tensor:
    """Stack 1-D int64 sequences into [B, T], padding on the right."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad, dtype=torch.int64)
    for row, s in enumerate(seqs):
        out[row, : len(s)] = s
    return out


def left_pad(seqs: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Stack prompts into ids [B, T] padded on the left, and the attention mask [B, T]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(seqs), width), dtype=torch.int64)
    for row, s in enumerate(seqs):
        ids[row, width - len(s):] = torch.tensor(s, dtype=torch.int64)
        mask[row, width - len(s):] = 1
    return ids, mask
