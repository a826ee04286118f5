"""Loss functions of the Tinker API, as sums over tokens (no normalisation).

Pure: per-token target logprobs and the datum's inputs in, per-token loss out. Masking is
done by the weights / advantages (zero on prompt positions). r = exp(target_lp - sampling_lp).

| loss                | per-token loss                                         | config            |
|---------------------|--------------------------------------------------------|-------------------|
| cross_entropy       | -lp * weights                                          | -                 |
| importance_sampling | -r * A                                                 | -                 |
| ppo                 | -min(r * A, clip(r, lo, hi) * A)                       | clip_*_threshold  |
| cispo               | -stopgrad(clip(r, lo, hi)) * lp * A                    | clip_*_threshold  |
| dro                 | -(lp * A - 0.5 * beta * (lp - sampling_lp)^2)          | beta              |
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lorafleet.errors import InvalidRequest, MissingLossInput, UnknownLoss

RL_INPUTS = ("target_tokens", "logprobs", "advantages")
REQUIRED: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),  # weights default to 1 when absent
    "importance_sampling": RL_INPUTS,
    "ppo": RL_INPUTS,
    "cispo": RL_INPUTS,
    "dro": RL_INPUTS,
}
CONFIG_DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "dro": {"beta": 0.05},
}
OPTIONAL_INPUTS = ("weights", "clip_low_threshold", "clip_high_threshold")
LOSSES = tuple(REQUIRED)


def resolve_config(loss_fn: str, config: dict[str, float]) -> dict[str, float]:
    """The loss's config with defaults filled in; unknown loss or keys are refused."""
    if loss_fn not in REQUIRED:
        raise UnknownLoss(f"unknown loss_fn {loss_fn!r}; supported: {list(LOSSES)}")
    defaults = CONFIG_DEFAULTS[loss_fn]
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise InvalidRequest(
            f"loss_fn_config keys {unknown} do not apply to {loss_fn}; it takes {sorted(defaults) or 'none'}"
        )
    return defaults | {k: float(v) for k, v in config.items()}


def check_inputs(loss_fn: str, n_tokens: int, inputs: dict[str, Tensor]) -> None:
    """Raise MissingLossInput unless `inputs` has what `loss_fn` needs, each of length N."""
    for key in REQUIRED[loss_fn]:
        if key not in inputs:
            raise MissingLossInput(f"{loss_fn} needs loss_fn_inputs[{key!r}]; got {sorted(inputs)}")
    allowed = set(REQUIRED[loss_fn]) | set(OPTIONAL_INPUTS)
    extra = sorted(set(inputs) - allowed)
    if extra:
        raise MissingLossInput(f"loss_fn_inputs {extra} are not used by {loss_fn}; it takes {sorted(allowed)}")
    for key, value in inputs.items():
        if tuple(value.shape) != (n_tokens,):
            raise MissingLossInput(
                f"loss_fn_inputs[{key!r}] has shape {tuple(value.shape)}; expected ({n_tokens},), "
                f"one value per input token"
            )
        if key != "target_tokens" and not torch.isfinite(value.float()).all():
            raise MissingLossInput(f"loss_fn_inputs[{key!r}] holds NaN or infinite values")


def _ratio_clip(inputs: dict[str, Tensor], config: dict[str, float], like: Tensor) -> tuple[Tensor, Tensor]:
    lo = inputs.get("clip_low_threshold", torch.full_like(like, config["clip_low_threshold"]))
    hi = inputs.get("clip_high_threshold", torch.full_like(like, config["clip_high_threshold"]))
    return lo.to(like.dtype), hi.to(like.dtype)


def cross_entropy(lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    weights = inputs.get("weights")
    return -lp if weights is None else -lp * weights.to(lp.dtype)


def importance_sampling(lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    ratio = torch.exp(lp - inputs["logprobs"].to(lp.dtype))
    return -ratio * inputs["advantages"].to(lp.dtype)


def ppo(lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    adv = inputs["advantages"].to(lp.dtype)
    ratio = torch.exp(lp - inputs["logprobs"].to(lp.dtype))
    lo, hi = _ratio_clip(inputs, config, lp)
    clipped = torch.minimum(torch.maximum(ratio, lo), hi)
    return -torch.minimum(ratio * adv, clipped * adv)


def cispo(lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    adv = inputs["advantages"].to(lp.dtype)
    ratio = torch.exp(lp - inputs["logprobs"].to(lp.dtype))
    lo, hi = _ratio_clip(inputs, config, lp)
    clipped = torch.minimum(torch.maximum(ratio, lo), hi).detach()
    return -clipped * lp * adv


def dro(lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    adv = inputs["advantages"].to(lp.dtype)
    diff = lp - inputs["logprobs"].to(lp.dtype)
    return -(lp * adv - 0.5 * config["beta"] * diff * diff)


LOSS_FNS: dict[str, Callable[[Tensor, dict[str, Tensor], dict[str, float]], Tensor]] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
}


def elementwise_loss(loss_fn: str, lp_N: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    """Per-token loss [N] of `loss_fn`; its sum is what forward_backward minimises."""
    return LOSS_FNS[loss_fn](lp_N, inputs, config)
