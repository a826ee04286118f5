"""Records of training work: datums, forward_backward requests and results, Adam params."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True, slots=True)
class Datum:
    """One training sequence.

    Args:
        tokens: int64 [N], the model input; position i predicts `target_tokens[i]`.
        loss_inputs: per-token tensors of length N: `target_tokens` (int64), and as the loss
            needs them `weights`, `logprobs` (sampling logprobs), `advantages` (float32), and
            optional per-token `clip_low_threshold` / `clip_high_threshold`.
        routes: MoE bases only: the expert ids chosen at every input position when the
            sequence was sampled (`SampledSequence.routes`, int [moe_layers, N, top_k]). The
            training forward reuses them (routing replay, MinT's R3) unless the request sets
            `replay_routes=False`; None routes by the current router.
    """

    tokens: Tensor
    loss_inputs: dict[str, Tensor]
    routes: Tensor | None = None


@dataclass(frozen=True, slots=True)
class FwdBwdRequest:
    """forward_backward for one adapter; several requests are fused into one batch."""

    adapter: int
    data: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_config: dict[str, float] = field(default_factory=dict)
    forward_only: bool = False
    replay_routes: bool = True  # use the data's recorded MoE routes (Datum.routes) where given


@dataclass(frozen=True, slots=True)
class FwdBwdResult:
    """Per-datum outputs (`logprobs`, `elementwise_loss`: float32 [N]) and summed metrics."""

    outputs: list[dict[str, Tensor]]
    metrics: dict[str, float]


@dataclass(frozen=True, slots=True)
class AdamParams:
    """AdamW hyper-parameters, with the Tinker SDK's defaults.

    Args:
        learning_rate: step size.
        beta1, beta2, eps: Adam moments and the denominator's epsilon.
        weight_decay: decoupled (AdamW) decay; 0 = off.
        grad_clip_norm: clip the adapter's global gradient norm to this; 0 = off.
    """

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0
