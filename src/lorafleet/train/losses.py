"""Loss functions of the Tinker API, as sums over tokens (no normalisation).

Pure: per-token target logprobs and the datum's inputs in, per-token loss out. Masking is
done by the weights / advantages (zero on prompt positions). r = exp(target_lp - sampling_lp).

| loss                | per-token loss                                         | config            |
|---------------------|--------------------------------------------------------|-------------------|
| cross_entropy       | -lp * weights  (lp, weights [N] or [N, K])             | -                 |
| importance_sampling | -r * A                                                 | -                 |
| ppo                 | -min(r * A, clip(r, lo, hi) * A)                       | clip_*_threshold  |
| cispo               | -stopgrad(clip(r, lo, hi)) * lp * A                    | clip_*_threshold  |
| dro                 | -(lp * A - 0.5 * beta * (lp - sampling_lp)^2)          | beta              |
| gspo                | -min(s_t * A, clip(s_t, lo, hi) * A)                   | clip_*_threshold  |

cross_entropy takes 2-D `target_tokens` / `weights` [N, K] (distillation onto a teacher's
top-K): the loss is -sum_t sum_k w_tk * log p(x_tk), and the logprobs are [N, K].

gspo (GSPO-token, Tinker's public loss docs): the sequence log-ratio is the mean of
stopgrad(lp) - sampling_lp over the tokens `sequence_ratio_mask` marks (every token when it
is absent); every token's ratio s_t = exp(seq + lp - stopgrad(lp)) carries the sequence
ratio's value and its own logprob's gradient, clipped as in ppo.

`stable_reinforce` has no published objective, so it cannot be reproduced faithfully: it is
refused with a message naming the published alternatives (`UNPUBLISHED`).
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
    "gspo": RL_INPUTS,
}
CONFIG_DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "dro": {"beta": 0.05},
    "gspo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
}
OPTIONAL_INPUTS = ("weights", "clip_low_threshold", "clip_high_threshold")
EXTRA_INPUTS: dict[str, tuple[str, ...]] = {"gspo": ("sequence_ratio_mask",)}
LOSSES = tuple(REQUIRED)
# Losses whose targets may be 2-D [N, K] (several weighted targets per position).
MULTI_TARGET = frozenset({"cross_entropy"})
PUBLISHED_RL = ("importance_sampling", "cispo", "gspo")
STABLE_REINFORCE = (
    "loss_fn 'stable_reinforce' is not supported by lorafleet: its objective is not published, so "
    "it cannot be reproduced faithfully. Use a published loss instead: 'importance_sampling', "
    "'cispo' or 'gspo' (tinker-cookbook recipes: pass loss_fn=importance_sampling, e.g. "
    "`python -m tinker_cookbook.recipes.rl_loop loss_fn=importance_sampling`; `lorafleet "
    "cookbook` does this for you). Samples need no record_stability_info then."
)
STABILITY_INFO = (
    "record_stability_info is not supported by lorafleet: it records what the 'stable_reinforce' "
    "loss needs, and that loss is not supported (its objective is not published). Use a published "
    "loss instead: 'importance_sampling', 'cispo' or 'gspo' (tinker-cookbook recipes: pass "
    "loss_fn=importance_sampling), and sample without record_stability_info."
)
UNPUBLISHED: dict[str, str] = {
    "stable_reinforce": STABLE_REINFORCE,
    "custom": "loss_fn 'custom' (server-side traced losses) is not supported by lorafleet; use "
              "TrainingClient.forward_backward_custom, which computes the loss on the client",
}


def resolve_config(loss_fn: str, config: dict[str, float]) -> dict[str, float]:
    """The loss's config with defaults filled in; unknown loss or keys are refused."""
    if loss_fn in UNPUBLISHED:
        raise UnknownLoss(UNPUBLISHED[loss_fn])
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
    """Raise MissingLossInput unless `inputs` has what `loss_fn` needs, each of length N.

    cross_entropy's `target_tokens` may be [N, K] (K >= 1), with `weights` of the same shape.
    """
    for key in REQUIRED[loss_fn]:
        if key not in inputs:
            raise MissingLossInput(f"{loss_fn} needs loss_fn_inputs[{key!r}]; got {sorted(inputs)}")
    allowed = set(REQUIRED[loss_fn]) | set(OPTIONAL_INPUTS) | set(EXTRA_INPUTS.get(loss_fn, ()))
    extra = sorted(set(inputs) - allowed)
    if extra:
        raise MissingLossInput(f"loss_fn_inputs {extra} are not used by {loss_fn}; it takes {sorted(allowed)}")
    target_shape = tuple(inputs["target_tokens"].shape)
    if loss_fn in MULTI_TARGET and len(target_shape) == 2 and target_shape[0] == n_tokens:
        if target_shape[1] < 1:
            raise MissingLossInput("loss_fn_inputs['target_tokens'] has shape "
                                   f"{target_shape}: 2-D targets need K >= 1 columns")
    elif target_shape != (n_tokens,):
        two_d = f" or ({n_tokens}, K)" if loss_fn in MULTI_TARGET else ""
        hint = "" if loss_fn in MULTI_TARGET or len(target_shape) != 2 else (
            f"; 2-D (N, K) targets are taken by {sorted(MULTI_TARGET)} only")
        raise MissingLossInput(
            f"loss_fn_inputs['target_tokens'] has shape {target_shape}; expected ({n_tokens},){two_d}, "
            f"one target per input token{hint}"
        )
    for key, value in inputs.items():
        want = target_shape if key == "weights" else (n_tokens,)
        if key != "target_tokens" and tuple(value.shape) != want:
            raise MissingLossInput(
                f"loss_fn_inputs[{key!r}] has shape {tuple(value.shape)}; expected {want}, "
                + ("the shape of target_tokens" if key == "weights" else "one value per input token")
            )
        if key != "target_tokens" and not torch.isfinite(value.float()).all():
            raise MissingLossInput(f"loss_fn_inputs[{key!r}] holds NaN or infinite values")
    mask = inputs.get("sequence_ratio_mask")
    if mask is not None and not bool((mask != 0).any()):
        raise MissingLossInput("loss_fn_inputs['sequence_ratio_mask'] marks no token: the sequence "
                               "ratio is a mean over the marked tokens, so mark at least one")


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


def gspo(lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    adv = inputs["advantages"].to(lp.dtype)
    mask = inputs.get("sequence_ratio_mask")
    in_ratio = torch.ones_like(lp) if mask is None else (mask != 0).to(lp.dtype)
    token_log_ratio = lp.detach() - inputs["logprobs"].to(lp.dtype)
    seq_log_ratio = (token_log_ratio * in_ratio).sum() / in_ratio.sum()
    ratio = torch.exp(seq_log_ratio + lp - lp.detach())
    lo, hi = _ratio_clip(inputs, config, lp)
    clipped = torch.minimum(torch.maximum(ratio, lo), hi)
    return -torch.minimum(ratio * adv, clipped * adv)


LOSS_FNS: dict[str, Callable[[Tensor, dict[str, Tensor], dict[str, float]], Tensor]] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "gspo": gspo,
}


def elementwise_loss(loss_fn: str, lp_N: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    """Per-token loss of `loss_fn` (the shape of the targets: [N], or [N, K] for 2-D
    cross_entropy targets); its sum is what forward_backward minimises."""
    return LOSS_FNS[loss_fn](lp_N, inputs, config)
