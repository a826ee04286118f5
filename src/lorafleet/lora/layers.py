"""MultiLoraLinear: a frozen nn.Linear plus the per-row LoRA update of the current batch.

The wrapper owns no adapter tensors. Before each forward the engine puts the batch's
gathered operands on the shared `LoraRuntime` (module path -> (aT_BKR, bT_BRD)); a module
that no adapter of the batch targets runs as the plain base layer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn.functional as F
from torch import Tensor, nn

from lorafleet.lora.math import apply_lora
from lorafleet.lora.moe import experts_forward, route, split_experts

# module path -> (aT_BKR, bT_BRD) gathered per row; routed experts (`...mlp.experts.{proj}`)
# instead hold their slot tables and the rows' slots: (a_SERK, b_SEDR, slot_B).
RowOperands = dict[str, tuple[Tensor, ...]]


class LoraRuntime(threading.local):
    """The LoRA operands of the batch being run, shared by every wrapper of one model.

    Thread-local: the scheduler's training and decode lanes run forwards of the same model at
    once (engine/scheduler.py), each with its own batch's operands, replay and recording.
    """

    def __init__(self) -> None:
        self.operands: RowOperands = {}
        # routing replay (R3): router path -> expert ids [B*T, k] to use (-1 rows: route normally)
        self.replay: dict[str, Tensor] = {}
        # when not None, every router writes the expert ids it used here: path -> [B*T, k]
        self.recorded: dict[str, Tensor] | None = None

    @contextmanager
    def use(self, operands: RowOperands) -> Iterator[None]:
        previous, self.operands = self.operands, operands
        try:
            yield
        finally:
            self.operands = previous

    @contextmanager
    def routes(
        self, replay: dict[str, Tensor] | None = None, record: dict[str, Tensor] | None = None
    ) -> Iterator[None]:
        """Replay the given expert choices and/or record the ones made, for one forward."""
        previous = self.replay, self.recorded
        self.replay, self.recorded = replay or {}, record
        try:
            yield
        finally:
            self.replay, self.recorded = previous


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


class MultiLoraRouter(nn.Module):
    """A frozen top-k MoE router (`mlp.gate`, weight [E, H]) plus a per-row LoRA on its logits.

    Also where routing replay happens and where expert choices are recorded (see LoraRuntime).
    Returns what transformers' TopKRouter returns: (logits_NE, weights_Nk, experts_Nk).
    """

    def __init__(self, base: nn.Module, path: str, runtime: LoraRuntime) -> None:
        super().__init__()
        self.base = base
        self.path = path
        self.runtime = runtime
        self.top_k = int(base.top_k)
        self.num_experts = int(base.num_experts)
        self.norm_topk_prob = bool(getattr(base, "norm_topk_prob", True))  # Mixtral: always

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x_NH = hidden_states.reshape(-1, self.base.weight.shape[1])
        logits_NE = F.linear(x_NH, self.base.weight)
        ops = self.runtime.operands.get(self.path)
        if ops is not None:
            rows = ops[0].shape[0]
            logits_NE = apply_lora(
                logits_NE.view(rows, -1, self.num_experts), x_NH.view(rows, -1, x_NH.shape[-1]), *ops
            ).view(-1, self.num_experts)
        weights_Nk, experts_Nk = route(logits_NE, self.top_k, self.norm_topk_prob, self.runtime.replay.get(self.path))
        if self.runtime.recorded is not None:
            self.runtime.recorded[self.path] = experts_Nk
        return logits_NE, weights_Nk, experts_Nk


class MultiLoraExperts(nn.Module):
    """Frozen routed experts (`mlp.experts`, a layout `moe.split_experts` knows) plus
    per-row LoRA on each expert's gate, up and down projections (operands at `{path}.{proj}`).

    Without operands it runs the base module unchanged (transformers' own kernel).
    """

    PROJS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, base: nn.Module, path: str, runtime: LoraRuntime) -> None:
        super().__init__()
        self.base = base
        self.path = path
        self.runtime = runtime

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        tables, slot_B = {}, None
        for proj in self.PROJS:
            ops = self.runtime.operands.get(f"{self.path}.{proj}")
            if ops is not None:
                tables[proj], slot_B = (ops[0], ops[1]), ops[2]
        if slot_B is None:
            return self.base(hidden_states, top_k_index, top_k_weights)
        slot_N = slot_B.repeat_interleave(hidden_states.shape[0] // slot_B.shape[0])
        return experts_forward(
            hidden_states, top_k_index, top_k_weights, split_experts(self.base), tables, slot_N
        )

