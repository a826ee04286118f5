"""CPU weight prepacking: batched inference through oneDNN's blocked weight layout.

On x86 CPUs torch's default fp32 GEMM reads an `nn.Linear` weight poorly for the skinny
activations of batched decoding (a few rows: one token per running sequence), so a decode step
of 9 rows costs about 2.5x one of a single row, where the weights' memory traffic alone would
allow ~1x. oneDNN can reorder a weight once into the blocked layout its kernels stream best
(what IPEX's `optimize` and inductor's CPU freezing pass do); rows then go through
`mkldnn._linear_pointwise`. Measured by `bench/cpu_prepack.py` (docs/BENCHMARKS.md).

    forward(x):  autograd on, or x has fewer than MIN_ROWS rows  ->  F.linear(x, weight)  (as before)
                 otherwise (decode steps, prefills, scoring)      ->  oneDNN, packed weight

(a row is one token of the batch: a decode step of 9 sequences has 9, a 5-token prefill 5.)

The plain weight stays (training's backward, and one-row decoding, where torch's GEMV is
faster, use it; tied embeddings keep reading it), so prepacking costs one more copy of every
Linear weight in memory: `lorafleet serve --no-cpu-prepack` turns it off. Results differ from
F.linear's by float rounding only. Only fp32 weights on CPU, and only where torch has oneDNN.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

MIN_ROWS = 4  # below this torch's own kernel is as fast or faster (bench/cpu_prepack.py)
ROWS_HINT = 16  # the batch size oneDNN picks its blocking for


class PrepackedLinear(nn.Linear):
    """An nn.Linear (same Parameters, so ties and state_dicts are unchanged) whose batched
    inference reads a oneDNN-packed copy of its weight."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.packed = _pack(self.weight)

    def __getstate__(self) -> dict:  # deepcopy and pickle: the packed copy is opaque, rebuilt
        state = dict(self.__dict__)
        del state["packed"]
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.packed = _pack(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.float32 or x.numel() < MIN_ROWS * x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _pack(weight: Tensor) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)


def supported(model: nn.Module) -> bool:
    """Whether `model` would be prepacked: fp32 on CPU, with torch built with oneDNN."""
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def prepack(model: nn.Module) -> int:
    """Swap every plain fp32 nn.Linear of `model` (on CPU) for a PrepackedLinear, in place;
    returns how many. Idempotent; a model `supported` rejects is left alone."""
    if not supported(model):
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32:
                setattr(parent, name, PrepackedLinear(child))
                swapped += 1
    if swapped:
        log.info("prepacked %d Linear weights for CPU inference (%.0f MiB more memory; "
                 "--no-cpu-prepack turns it off)", swapped, packed_bytes(model) / 2**20)
    return swapped


def packed_bytes(model: nn.Module) -> int:
    """The memory the packed copies of `model` take: its prepacked Linear weights once more."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if isinstance(m, PrepackedLinear))
