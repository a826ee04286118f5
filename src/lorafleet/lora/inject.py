"""Find the LoRA-able projections of a transformers decoder and wrap them in place."""

from __future__ import annotations

from torch import nn

from lorafleet.lora.layers import LoraRuntime, MultiLoraExperts, MultiLoraLinear, MultiLoraRouter, is_moe_block
from lorafleet.lora.spec import ALL_MODULES


def inject(model: nn.Module, targets: tuple[str, ...] = ALL_MODULES) -> LoraRuntime:
    """Wrap every nn.Linear named in `targets` (e.g. `...self_attn.q_proj`) with MultiLoraLinear.

    The base weights stay where they are (the wrapper holds the same nn.Linear), so loading
    or unloading adapters never touches them. Returns the runtime that feeds the wrappers.
    Idempotent: an already injected model returns its existing runtime.
    """
    existing = getattr(model, "_lorafleet_runtime", None)
    if existing is not None:
        return existing
    runtime = LoraRuntime()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                path = f"{name}.{child_name}" if name else child_name
                setattr(module, child_name, MultiLoraLinear(child, path, runtime))
    _inject_moe(model, runtime)
    model._lorafleet_runtime = runtime  # type: ignore[attr-defined]
    return runtime


def _inject_moe(model: nn.Module, runtime: LoraRuntime) -> None:
    """Wrap every sparse MoE block's router (`mlp.gate`) and routed experts (`mlp.experts`).

    Shared experts are plain MLPs of nn.Linear and were wrapped above (one LoRA each).
    """
    for name, module in list(model.named_modules()):
        if is_moe_block(module):
            module.gate = MultiLoraRouter(module.gate, f"{name}.gate", runtime)
            module.experts = MultiLoraExperts(module.experts, f"{name}.experts", runtime)
