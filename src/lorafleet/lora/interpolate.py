"""Weighted combinations of LoRA adapters ("adapter soups"), exactly or re-projected to a rank.

Each adapter i adds `s_i * B_i @ A_i` to a module (s_i = alpha_i / r_i, or alpha_i / sqrt(r_i)
with rsLoRA). A combination `sum_i c_i * s_i * B_i @ A_i` is itself a LoRA of rank sum_i r_i:
stack the A_i (rows) and the B_i (columns, each scaled by c_i * s_i), with scale 1. That is
exact. `reproject` then finds, per module, the best rank-k approximation of that update
(Eckart-Young, through a QR of each factor so only an (R x R) core is decomposed); its
Frobenius error is the root of the sum of the squared dropped singular values, which it reports.

MoE routed experts (packed pairs `A [E, r, in]`, `B [E, out, r]`) combine per expert: every
operation here works on the last two dimensions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorafleet.errors import IncompatibleAdapter
from lorafleet.lora.spec import MAX_RANK, LoraSpec
from lorafleet.lora.weights import LoraWeights


@dataclass(frozen=True, slots=True)
class Combined:
    """The combination: its weights, and per module the Frobenius error of a re-projection
    (all zero when exact)."""

    weights: LoraWeights
    errors: dict[str, float]

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def check_compatible(sources: Sequence[LoraWeights]) -> None:
    """Same rank, same target modules and the same module paths and shapes, or IncompatibleAdapter."""
    first = sources[0]
    for i, w in enumerate(sources[1:], start=1):
        if w.spec.rank != first.spec.rank:
            raise IncompatibleAdapter(f"source {i} has LoRA rank {w.spec.rank}, source 0 rank "
                                      f"{first.spec.rank}: interpolate adapters of one rank")
        if w.spec.target_modules != first.spec.target_modules:
            raise IncompatibleAdapter(f"source {i} targets {list(w.spec.target_modules)}, source 0 "
                                      f"{list(first.spec.target_modules)}")
        if set(w.pairs) != set(first.pairs):
            raise IncompatibleAdapter(f"source {i} adapts other modules than source 0")
        for path, (a, b) in w.pairs.items():
            a0, b0 = first.pairs[path]
            if a.shape != a0.shape or b.shape != b0.shape:
                raise IncompatibleAdapter(f"source {i}: {path} has shapes {tuple(a.shape)}, "
                                          f"{tuple(b.shape)}; source 0 {tuple(a0.shape)}, {tuple(b0.shape)}")


def _stack(sources: Sequence[LoraWeights], coefficients: Sequence[float]) -> tuple[dict, int]:
    """Per module the stacked (A, B) of sum_i c_i s_i B_i A_i (scale 1), and its rank."""
    if len(sources) != len(coefficients) or not sources:
        raise IncompatibleAdapter(f"{len(sources)} sources but {len(coefficients)} coefficients")
    check_compatible(sources)
    pairs = {path: (torch.cat([w.pairs[path][0].float() for w in sources], dim=-2),
                    torch.cat([w.pairs[path][1].float() * (c * w.spec.scale)
                               for w, c in zip(sources, coefficients, strict=True)], dim=-1))
             for path in sources[0].pairs}
    return pairs, sum(w.spec.rank for w in sources)


def combine(sources: Sequence[LoraWeights], coefficients: Sequence[float]) -> LoraWeights:
    """The exact combination, of rank sum r_i, with scale 1 (alpha = rank)."""
    pairs, rank = _stack(sources, coefficients)
    if rank > MAX_RANK:
        raise IncompatibleAdapter(f"the exact combination has rank {rank}, over the limit of {MAX_RANK}: "
                                  "pass target_rank to re-project it")
    spec = LoraSpec(rank=rank, alpha=float(rank), target_modules=sources[0].spec.target_modules)
    return LoraWeights(spec, pairs)


def reproject(weights: LoraWeights, rank: int) -> Combined:
    """The best rank-`rank` LoRA of each module's update (scale 1), and its Frobenius errors."""
    return _reproject(weights.pairs, weights.spec.scale, rank, weights.spec.target_modules)


def _reproject(pairs_in: dict, scale: float, rank: int, targets: tuple[str, ...]) -> Combined:
    if not 1 <= rank <= MAX_RANK:
        raise IncompatibleAdapter(f"target_rank must be in 1..{MAX_RANK}, got {rank}")
    pairs, errors = {}, {}
    for path, (a, b) in pairs_in.items():
        a, b = a.double(), b.double() * scale
        qb, rb = torch.linalg.qr(b)  # b = qb rb: [out, R'] [R', R]
        qa, ra = torch.linalg.qr(a.transpose(-1, -2))  # a^T = qa ra: [in, R'] [R', R]
        u, sv, vh = torch.linalg.svd(rb @ ra.transpose(-1, -2))  # the core, [R', R']
        k = min(rank, sv.shape[-1])
        root = sv[..., :k].sqrt()
        new_b = (qb @ u[..., :, :k]) * root.unsqueeze(-2)
        new_a = root.unsqueeze(-1) * (vh[..., :k, :] @ qa.transpose(-1, -2))
        if k < rank:  # fewer independent directions than asked: pad with zeros
            new_b = torch.cat([new_b, new_b.new_zeros(*new_b.shape[:-1], rank - k)], dim=-1)
            new_a = torch.cat([new_a, new_a.new_zeros(*new_a.shape[:-2], rank - k, new_a.shape[-1])], dim=-2)
        pairs[path] = (new_a.float().contiguous(), new_b.float().contiguous())
        errors[path] = float(sv[..., k:].pow(2).sum().sqrt())
    spec = LoraSpec(rank=rank, alpha=float(rank), target_modules=targets)
    return Combined(LoraWeights(spec, pairs), errors)


def interpolate(sources: Sequence[LoraWeights], coefficients: Sequence[float],
                target_rank: int | None = None) -> Combined:
    """`combine`, then a re-projection when a target rank is given (the stacked combination
    may then exceed the rank limit: only its projection becomes an adapter)."""
    if target_rank is None:
        return Combined(combine(sources, coefficients), {p: 0.0 for p in sources[0].pairs})
    pairs, _ = _stack(sources, coefficients)
    return _reproject(pairs, 1.0, target_rank, sources[0].spec.target_modules)
