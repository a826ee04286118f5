"""Test helpers (not fixtures): adapters with non-zero updates, PEFT models on a base."""

from __future__ import annotations

import torch

from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.weights import LoraWeights
from lorafleet.model.registry import BaseInfo


def random_adapter(info: BaseInfo, spec: LoraSpec, seed: int, b_scale: float = 0.05) -> LoraWeights:
    """PEFT init for A plus a random B, so the adapter really changes the outputs."""
    w = LoraWeights.init(info, spec, seed)
    g = torch.Generator().manual_seed(seed + 10_000)
    return LoraWeights(spec, {p: (a, torch.randn(b.shape, generator=g) * b_scale) for p, (a, b) in w.pairs.items()})


def fresh_hf_model(name: str, paths):
    """An un-injected copy of a base model (PEFT wraps its own)."""
    from lorafleet.model import load_base

    return load_base(name, paths).model
