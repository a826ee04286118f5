"""Per-adapter AdamW: state that can be exported and restored, and one step.

    g <- g * min(1, clip / ||g||)                (global norm over the adapter; clip 0 = off)
    p <- p * (1 - lr * wd)                       (decoupled weight decay)
    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lorafleet.errors import InvalidRequest
from lorafleet.train.types import AdamParams


@dataclass(slots=True)
class AdamState:
    """First and second moments per parameter, and the number of steps taken."""

    step: int
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]

    @classmethod
    def zeros(cls, params: list[Tensor]) -> AdamState:
        return cls(0, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params])

    def to_tensors(self, names: list[str]) -> dict[str, Tensor]:
        """The state keyed by parameter name (`exp_avg.<name>`), so it survives reordering."""
        out = {"step": torch.tensor([self.step], dtype=torch.int64)}
        for name, m, v in zip(names, self.exp_avg, self.exp_avg_sq, strict=True):
            out[f"exp_avg.{name}"] = m.clone()
            out[f"exp_avg_sq.{name}"] = v.clone()
        return out

    @classmethod
    def from_tensors(cls, state: dict[str, Tensor], params: list[Tensor], names: list[str]) -> AdamState:
        try:
            exp_avg = [state[f"exp_avg.{n}"].clone() for n in names]
            exp_avg_sq = [state[f"exp_avg_sq.{n}"].clone() for n in names]
            step = int(state["step"].item())
        except KeyError as e:
            raise InvalidRequest(f"optimizer state lacks {e.args[0]!r}") from e
        for name, p, m, v in zip(names, params, exp_avg, exp_avg_sq):
            if m.shape != p.shape or v.shape != p.shape:
                raise InvalidRequest(f"optimizer state of {name} does not match the adapter's shape {tuple(p.shape)}")
        exp_avg = [m.to(p.device, p.dtype) for m, p in zip(exp_avg, params)]
        exp_avg_sq = [v.to(p.device, p.dtype) for v, p in zip(exp_avg_sq, params)]
        return cls(step, exp_avg, exp_avg_sq)


def validate(params: AdamParams) -> None:
    checks = {
        "learning_rate": params.learning_rate >= 0,
        "beta1": 0 <= params.beta1 < 1,
        "beta2": 0 <= params.beta2 < 1,
        "eps": params.eps >= 0,
        "weight_decay": params.weight_decay >= 0,
        "grad_clip_norm": params.grad_clip_norm >= 0,
    }
    for name, ok in checks.items():
        value = getattr(params, name)
        if not ok or not math.isfinite(value):
            raise InvalidRequest(f"adam_params.{name}={value!r} is out of range")


@torch.no_grad()
def adamw_step(params: list[Tensor], grads: list[Tensor], state: AdamState, hp: AdamParams) -> dict[str, float]:
    """Update `params` in place from `grads`; returns the step's metrics."""
    validate(hp)
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    if hp.grad_clip_norm > 0 and grad_norm > hp.grad_clip_norm:
        grads = torch._foreach_mul(grads, hp.grad_clip_norm / (grad_norm + 1e-6))
    state.step += 1
    t = state.step
    if hp.weight_decay > 0:
        torch._foreach_mul_(params, 1 - hp.learning_rate * hp.weight_decay)
    torch._foreach_lerp_(state.exp_avg, grads, 1 - hp.beta1)
    torch._foreach_mul_(state.exp_avg_sq, hp.beta2)
    torch._foreach_addcmul_(state.exp_avg_sq, grads, grads, 1 - hp.beta2)
    bias1 = 1 - hp.beta1**t
    bias2 = 1 - hp.beta2**t
    denom = torch._foreach_sqrt(state.exp_avg_sq)
    torch._foreach_div_(denom, math.sqrt(bias2))
    torch._foreach_add_(denom, hp.eps)
    torch._foreach_addcdiv_(params, state.exp_avg, denom, -hp.learning_rate / bias1)
    return {"grad_norm:mean": grad_norm, "learning_rate:mean": hp.learning_rate, "step:max": float(t)}
