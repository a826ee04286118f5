"""MultiLoraLinear: a frozen nn.Linear plus the per-row LoRA update of the current batch.

The wrapper owns no adapter tensors. Before each forward the engine puts the batch's
gathered operands on the shared `LoraRuntime` (module path -> (aT_BKR, bT_BRD)); a module
that no adapter of the batch targets runs as the plain base layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from lorafleet.lora.math import apply_lora

RowOperands = dict[str, tuple[Tensor, Tensor]]


class LoraRuntime:
    """The LoRA operands of the batch being run, shared by every wrapper of one model."""

    def __init__(self) -> None:
        self.operands: RowOperands = {}

    @contextmanager
    def use(self, operands: RowOperands) -> Iterator[None]:
        previous, self.operands = self.operands, operands
        try:
            yield
        finally:
            self.operands = previous


class MultiLoraLinear(nn.Module):
    """A frozen base Linear (`base`, never modified) plus a per-row LoRA update."""

    def __init__(self, base: nn.Linear, path: str, runtime: LoraRuntime) -> None:
        super().__init__()
        self.base = base
        self.path = path
        self.runtime = runtime

    @property
    def weight(self) -> Tensor:  # some HF code reads `.weight.dtype` of projections
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        ops = self.runtime.operands.get(self.path)
        if ops is None:
            return y
        shape = y.shape
        x3, y3 = x.reshape(ops[0].shape[0], -1, x.shape[-1]), y.reshape(ops[0].shape[0], -1, y.shape[-1])
        return apply_lora(y3, x3, *ops).reshape(shape)
