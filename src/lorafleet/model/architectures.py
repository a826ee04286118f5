"""Which decoder architectures lorafleet serves, and where their LoRA sites are.

LoRA sites are found from the model's own modules, never from a fixed path map:

- every `nn.Linear` inside a decoder layer (`...layers.{i}....`) whose name is a known
  projection (`lora.spec.LINEAR_MODULES`: `q_proj`, fused `qkv_proj` / `gate_up_proj` (Phi-3),
  MLA's `q_a_proj` / `q_b_proj` / `kv_a_proj_with_mqa` / `kv_b_proj` (DeepSeek-V2/V3),
  `gate_proj` of a dense MLP or of a shared expert, ...) is a 2-D site;
- every sparse MoE block whose `experts` module holds fused 3-D expert tensors in a layout
  `lora.moe` knows (`EXPERT_LAYOUTS`) gives one packed site per projection,
  `...mlp.experts.{gate_proj|up_proj|down_proj}` (A [E, r, in], B [E, out, r]);
- the LM head `lm_head` (an `nn.Linear` on the model itself) is a site, opt-in (Tinker's
  `train_unembed`): it is not among `BaseInfo.lora_modules`, see `BaseInfo.unembed`;
- its router `...mlp.gate` is a site when it is a plain top-k softmax router, which
  `MultiLoraRouter` reproduces exactly (Qwen2/Qwen3-MoE, OLMoE, Mixtral). Grouped or
  sigmoid routers (DeepSeek) and biased top-k-then-softmax ones (gpt-oss) stay frozen and
  unwrapped: no router LoRA, no routing replay there.

The same walk runs on a meta-device copy (shapes without weights, for `BaseInfo`) and on the
loaded model (to inject), so the two always agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorafleet.errors import UnknownBaseModel
from lorafleet.lora.spec import LINEAR_MODULES, SUPPORTED_MODULES

# transformers model_type -> what we call the family in messages and docs.
SUPPORTED: dict[str, str] = {
    "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
    "gemma3_text": "Gemma 3", "phi3": "Phi-3", "olmo2": "OLMo 2",
    "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE", "olmoe": "OLMoE", "mixtral": "Mixtral",
    "deepseek_v2": "DeepSeek-V2", "deepseek_v3": "DeepSeek-V3", "gpt_oss": "gpt-oss",
}
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_supported(model_type: str | None, where: str) -> None:
    """Raise UnknownBaseModel unless `model_type` is an architecture we serve."""
    if model_type not in SUPPORTED:
        listed = ", ".join(f"{v} ({k})" for k, v in SUPPORTED.items())
        raise UnknownBaseModel(f"{where}: architecture {model_type!r} is not supported; supported: {listed}")


@dataclass(frozen=True, slots=True)
class Site:
    """One LoRA site: a module path, the (out, in) of its projection, its expert count (0: 2-D)."""

    path: str
    out_features: int
    in_features: int
    experts: int = 0

    @property
    def proj(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def layer(self) -> int:
        """The decoder layer of the site; the LM head comes after the last layer."""
        m = LAYER.search(self.path)
        return int(m.group(1)) if m else 1 << 30


def expert_layout(experts: nn.Module) -> str | None:
    """`"concat"` (gate_up_proj [E, 2I, H] = [gate; up], down_proj [E, H, I], no bias: Qwen-MoE,
    OLMoE, Mixtral, DeepSeek), `"gpt_oss"` (transposed [E, H, 2I], gate/up interleaved, biases),
    or None (not fused experts we know)."""
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, Tensor) and isinstance(down, Tensor) and gate_up.ndim == down.ndim == 3):
        return None
    if isinstance(getattr(experts, "gate_up_proj_bias", None), Tensor):
        return "gpt_oss" if hasattr(experts, "limit") and hasattr(experts, "alpha") else None
    if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False):
        return None
    return "concat" if getattr(experts, "is_concatenated", True) else None


def expert_dims(experts: nn.Module) -> tuple[int, int, int]:
    """(experts, intermediate, hidden) of a fused experts module of a known layout."""
    down = experts.down_proj
    if expert_layout(experts) == "gpt_oss":
        return int(down.shape[0]), int(down.shape[1]), int(down.shape[2])
    return int(down.shape[0]), int(down.shape[2]), int(down.shape[1])


def softmax_router(block: nn.Module) -> nn.Module | None:
    """The block's router when it is a plain top-k softmax one (`weight [E, H]`, no bias, no
    grouping or score correction), else None."""
    gate = getattr(block, "gate", None)
    if not isinstance(gate, nn.Module) or isinstance(gate, nn.Linear):
        return None
    weight = getattr(gate, "weight", None)
    if not (isinstance(weight, Tensor) and weight.ndim == 2 and hasattr(gate, "top_k") and hasattr(gate, "num_experts")):
        return None
    if any(hasattr(gate, a) for a in ("bias", "e_score_correction_bias", "routed_scaling_factor", "topk_method")):
        return None
    return gate


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, block) of every sparse MoE block inside a decoder layer with fused experts of a known layout."""
    return [
        (name, module) for name, module in model.named_modules()
        if isinstance(getattr(module, "experts", None), nn.Module) and expert_layout(module.experts)
        and LAYER.search(name + ".")
    ]


def lora_sites(model: nn.Module) -> list[Site]:
    """Every LoRA site of an un-injected `model` (see the module doc), in layer order, then
    canonical projection order (attention, MLP, router; routed experts before a shared expert)."""
    sites: list[Site] = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in LINEAR_MODULES and isinstance(module, nn.Linear) and LAYER.search(name):
            sites.append(Site(name, module.out_features, module.in_features))
    for block_path, block in moe_blocks(model):
        n_exp, inter, hidden = expert_dims(block.experts)
        shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        sites += [Site(f"{block_path}.experts.{p}", *shapes[p], n_exp) for p in EXPERT_PROJS]
        router = softmax_router(block)
        if router is not None:
            sites.append(Site(f"{block_path}.gate", int(router.weight.shape[0]), int(router.weight.shape[1])))
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):  # the LM head (Tinker's train_unembed), after the layers
        sites.append(Site("lm_head", head.out_features, head.in_features))
    order = {m: i for i, m in enumerate(SUPPORTED_MODULES)}
    sites.sort(key=lambda s: (s.layer, order[s.proj], 0 if ".experts." in s.path else 1))
    return sites


def meta_model(cfg: Any) -> nn.Module:
    """The model of a transformers config on the meta device: its module tree, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
