"""LoraWeights: one adapter's A/B tensors per module path, with shape checks and init."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lorafleet.errors import IncompatibleAdapter
from lorafleet.lora.spec import LoraSpec
from lorafleet.model.registry import BaseInfo, check_adapter_fits, check_targets, lora_shape

# A module path names one projection in one layer: `model.layers.3.self_attn.q_proj`. On a MoE
# base the routed experts' projection of a layer is one path, `model.layers.3.mlp.experts.up_proj`,
# whose pair is packed: (A [E, r, in], B [E, out, r]); the shared expert's is
# `model.layers.3.mlp.shared_expert.up_proj` (one 2-D pair), the router's `model.layers.3.mlp.gate`.
ModulePath = str


def module_paths(info: BaseInfo, spec: LoraSpec) -> list[ModulePath]:
    """Every module path `spec` puts a LoRA on, in the base's site order (layer by layer)."""
    return [path for path, site in info.sites.items() if site.proj in spec.target_modules]


@dataclass(slots=True)
class LoraWeights:
    """A (A [r, in], B [out, r]) pair per module path, fp32. B @ A is the (unscaled) update."""

    spec: LoraSpec
    pairs: dict[ModulePath, tuple[Tensor, Tensor]]

    @classmethod
    def init(cls, info: BaseInfo, spec: LoraSpec, seed: int | None = None) -> LoraWeights:
        """PEFT's default init: A ~ kaiming_uniform(a=sqrt(5)), B = 0, so the update starts at 0."""
        check_targets(info, spec)
        gen = torch.Generator()
        gen.manual_seed(seed if seed is not None else torch.seed())
        pairs = {}
        for path in module_paths(info, spec):
            out_f, in_f, n_exp, _ = lora_shape(info, path)
            lead = (n_exp,) if n_exp else ()  # routed experts: one independent pair per expert
            bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform with a=sqrt(5) on [r, in_f]
            a = (torch.rand(*lead, spec.rank, in_f, generator=gen) * 2 - 1) * bound
            pairs[path] = (a, torch.zeros(*lead, out_f, spec.rank))
        return cls(spec, pairs)

    def checked(self, info: BaseInfo) -> LoraWeights:
        """Self, after checking that every tensor fits `info` and the adapter is complete."""
        check_adapter_fits(info, self.spec, self.pairs)
        want = set(module_paths(info, self.spec))
        missing = sorted(want - set(self.pairs))
        if missing:
            raise IncompatibleAdapter(
                f"adapter lacks {len(missing)} of its target modules, e.g. {missing[:3]}"
            )
        # One check over every value (a MoE adapter has hundreds of tensors); find the culprit
        # only on failure. x * 0 is 0 exactly when x is finite (inf * 0 and nan * 0 are nan), and
        # this sum is ~10x faster than torch.isfinite on CPU.
        flat = [t.reshape(-1) for pair in self.pairs.values() for t in pair]
        if flat and not bool((torch.cat(flat) * 0).sum() == 0):
            for path, (a, b) in self.pairs.items():
                if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                    raise IncompatibleAdapter(f"{path}: non-finite values in the adapter")
        return self

    def clone(self) -> LoraWeights:
        return LoraWeights(self.spec, {p: (a.detach().clone(), b.detach().clone()) for p, (a, b) in self.pairs.items()})

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.pairs.values())
