"""Wrap the LoRA sites of a transformers decoder in place (sites: model/architectures.py)."""

from __future__ import annotations

from torch import nn

from lorafleet.lora.layers import LoraRuntime, MultiLoraExperts, MultiLoraLinear, MultiLoraRouter
from lorafleet.lora.spec import ALL_MODULES
from lorafleet.model.architectures import lora_sites, moe_blocks, softmax_router


def inject(model: nn.Module, targets: tuple[str, ...] = ALL_MODULES) -> LoraRuntime:
    """Wrap every 2-D LoRA site whose projection is in `targets` with MultiLoraLinear, and every
    sparse MoE block's experts (and its router, where it is a plain softmax one).

    The base weights stay where they are (the wrapper holds the same module), so loading
    or unloading adapters never touches them. Returns the runtime that feeds the wrappers.
    Idempotent: an already injected model returns its existing runtime.
    """
    existing = getattr(model, "_lorafleet_runtime", None)
    if existing is not None:
        return existing
    runtime = LoraRuntime()
    blocks = moe_blocks(model)
    for site in lora_sites(model):
        if site.experts or site.proj not in targets or site.proj == "gate":
            continue
        parent, _, leaf = site.path.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, leaf, MultiLoraLinear(getattr(owner, leaf), site.path, runtime))
    for name, block in blocks:
        if softmax_router(block) is not None:
            block.gate = MultiLoraRouter(block.gate, f"{name}.gate", runtime)
        block.experts = MultiLoraExperts(block.experts, f"{name}.experts", runtime)
    model._lorafleet_runtime = runtime  # type: ignore[attr-defined]
    return runtime
