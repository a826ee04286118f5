"""SlotTable: preallocated per-module adapter buffers that sampling rows index by slot.

vLLM's `lora_index_to_id` design: every LoRA module path has one buffer pair
`a [S+1, R, K]`, `b [S+1, D, R]` (routed experts: `[S+1, E, R, K]`, `[S+1, E, D, R]`) on the
model's device and dtype, the adapter's scale folded into B on copy (as `stack_table` does, so
the numbers are the same). Slot 0 is all zeros: the base alone.
Activating an adapter copies its tensors into a free slot (once; the host tier keeps the only
other copy); a batch carries a row -> slot index and gathers its per-row operands from the
buffers, so nothing is restacked per batch. Ranks below the buffer's are zero-padded (zero
rows add nothing). Buffers are allocated per module on first use and widened (copying the
slots already there) the first time a larger rank arrives.

The pure reference is `lora.math.stack_table` + `gather_rows` (engine/batch.py
`row_operands`), which the tests compare against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorafleet.lora.layers import RowOperands
from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.weights import LoraWeights


class SlotTable:
    """`max_slots` adapter slots (1..max_slots) over every LoRA module of one base."""

    def __init__(self, max_slots: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.max_slots = max_slots
        self.dtype = dtype
        self.device = torch.device(device)
        self._a: dict[str, Tensor] = {}
        self._b: dict[str, Tensor] = {}
        self._specs: dict[int, LoraSpec] = {}
        self._paths: dict[int, frozenset[str]] = {}

    def load(self, slot: int, weights: LoraWeights) -> None:
        """Copy `weights` into `slot` (replacing what was there)."""
        if not 1 <= slot <= self.max_slots:
            raise IndexError(f"slot {slot} is outside 1..{self.max_slots}")
        self.clear(slot)
        for path, (a, b) in weights.pairs.items():
            a_buf, b_buf = self._buffers(path, a, b)
            r = a.shape[-2]
            a_buf[slot, ..., :r, :].copy_(a)
            b_buf[slot, ..., :r].copy_(b.to(self.dtype) * weights.spec.scale)
        self._specs[slot] = weights.spec
        self._paths[slot] = frozenset(weights.pairs)

    def clear(self, slot: int) -> None:
        for path in self._paths.pop(slot, ()):
            self._a[path][slot].zero_()
            self._b[path][slot].zero_()
        self._specs.pop(slot, None)

    def read(self, slot: int) -> LoraWeights:
        """The adapter in `slot`, as fp32 CPU copies, B unscaled (for tests and checks)."""
        spec = self._specs[slot]
        pairs = {p: (self._a[p][slot, ..., : spec.rank, :].to("cpu", torch.float32).clone(),
                     self._b[p][slot, ..., : spec.rank].to("cpu", torch.float32) / spec.scale)
                 for p in sorted(self._paths[slot])}
        return LoraWeights(spec, pairs)

    def operands(self, slot_B: Tensor) -> RowOperands:
        """Per-row LoRA operands of a batch whose row b uses slot `slot_B[b]` (0 = none).

        Only the modules some slot of the batch targets get operands (others run as the plain
        base layer). 2-D modules: (aT_BKR, bT_BRD) with the scale folded into B, as
        `gather_rows` gives; routed experts: their slot tables and the rows' slots.
        """
        used = {int(s) for s in slot_B.unique().tolist()} - {0}
        paths = sorted(set().union(*(self._paths.get(s, frozenset()) for s in used))) if used else []
        if not paths:
            return {}
        slot_B = slot_B.to(self.device)
        ops: RowOperands = {}
        for path in paths:
            a, b = self._a[path], self._b[path]
            if a.ndim == 4:  # routed experts: [S+1, E, R, K], [S+1, E, D, R]
                ops[path] = (a, b, slot_B)
            else:
                ops[path] = (a[slot_B].transpose(1, 2), b[slot_B].transpose(1, 2))
        return ops

    def _buffers(self, path: str, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """The buffers of `path`, allocated or widened to hold rank `a.shape[-2]`."""
        r = a.shape[-2]
        have = self._a.get(path)
        if have is not None and have.shape[-2] >= r:
            return have, self._b[path]
        n = self.max_slots + 1
        a_new = torch.zeros(n, *a.shape[:-2], r, a.shape[-1], dtype=self.dtype, device=self.device)
        b_new = torch.zeros(n, *b.shape[:-1], r, dtype=self.dtype, device=self.device)
        if have is not None:
            old = have.shape[-2]
            a_new[..., :old, :].copy_(have)
            b_new[..., :old].copy_(self._b[path])
        self._a[path], self._b[path] = a_new, b_new
        return a_new, b_new
