"""LoraSpec: the shape of an adapter (rank, alpha, targets) and its PEFT config form."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lorafleet.errors import IncompatibleAdapter

# Projection names a LoRA can target (PEFT's `target_modules`), in canonical order. Besides
# Llama's, Phi-3's fused `qkv_proj` / `gate_up_proj` and MLA's (DeepSeek-V2/V3) low-rank
# query and key/value projections. Which of them a base has is found from its modules
# (model/architectures.py).
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj",
                "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
LINEAR_MODULES = ATTN_MODULES + MLP_MODULES
# The default targets: Llama-style attention and MLP.
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The MoE router (`mlp.gate`, [num_experts, hidden]); opt-in, never part of the default targets.
ROUTER_MODULES = ("gate",)
# The LM head (`lm_head`, [vocab, hidden]; Tinker's `train_unembed`); opt-in too. On bases with
# tied embeddings the LoRA adds to the head's output only, as PEFT's does: the input embedding
# stays the base's.
UNEMBED_MODULES = ("lm_head",)
SUPPORTED_MODULES = LINEAR_MODULES + ROUTER_MODULES + UNEMBED_MODULES
# PEFT `target_parameters` on transformers' fused expert tensors -> our projection names.
PEFT_EXPERT_PARAMETERS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
MAX_RANK = 128


@dataclass(frozen=True, slots=True)
class LoraSpec:
    """What an adapter looks like, independent of its values.

    Args:
        rank: `r`, 1..128.
        alpha: `lora_alpha`; the update is scaled by alpha/r (alpha/sqrt(r) with rslora).
        target_modules: projection names (PEFT's `target_modules`), a subset of LINEAR_MODULES, plus
            `gate` (the router) on MoE bases and `lm_head` (the LM head). On a MoE base the MLP names put one LoRA on every
            routed expert's projection (and one on the shared expert, if any).
        use_rslora: rank-stabilised scaling.
    """

    rank: int
    alpha: float = 32.0
    target_modules: tuple[str, ...] = ALL_MODULES
    use_rslora: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or not 1 <= self.rank <= MAX_RANK:
            raise IncompatibleAdapter(f"rank must be an integer in 1..{MAX_RANK}, got {self.rank!r}")
        if not self.target_modules:
            raise IncompatibleAdapter("target_modules is empty: an adapter must target a module")
        unknown = sorted(set(self.target_modules) - set(SUPPORTED_MODULES))
        if unknown:
            raise IncompatibleAdapter(
                f"unsupported target modules {unknown}; supported: {list(SUPPORTED_MODULES)}"
            )
        # Canonical order so equal specs compare equal whatever order the caller used.
        ordered = tuple(m for m in SUPPORTED_MODULES if m in set(self.target_modules))
        object.__setattr__(self, "target_modules", ordered)
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise IncompatibleAdapter(f"lora_alpha must be a positive number, got {self.alpha!r}")

    @property
    def scale(self) -> float:
        """The factor the B @ A update is multiplied by."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_peft_config(self, base_model: str) -> dict[str, Any]:
        """The `adapter_config.json` PEFT writes for the same adapter."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": int(self.alpha) if float(self.alpha).is_integer() else self.alpha,
            "lora_dropout": 0.0,
            "target_modules": list(self.target_modules),
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
            "use_dora": False,
        }

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> LoraSpec:
        """Parse a PEFT `adapter_config.json`; refuse features we do not implement."""
        if config.get("peft_type", "LORA") != "LORA":
            raise IncompatibleAdapter(f"peft_type {config.get('peft_type')!r} is not LORA")
        for key in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern"):
            if config.get(key):
                raise IncompatibleAdapter(f"adapter_config.json: {key} is not supported")
        if config.get("bias", "none") != "none":
            raise IncompatibleAdapter("adapter_config.json: only bias='none' is supported")
        if "r" not in config:
            raise IncompatibleAdapter("adapter_config.json has no 'r' (rank)")
        targets = config.get("target_modules")
        if isinstance(targets, str):
            raise IncompatibleAdapter("regex target_modules are not supported; list module names")
        params = list(config.get("target_parameters") or ())
        extra: dict[str, Any] = {}
        if params:  # PEFT LoRA on transformers' fused 3-D expert tensors (`mlp.experts.gate_up_proj`)
            names = [p.rsplit(".", 1)[-1] for p in params]
            unknown = sorted(set(names) - set(PEFT_EXPERT_PARAMETERS))
            if unknown or not all(p.endswith(f"experts.{n}") for p, n in zip(params, names)):
                raise IncompatibleAdapter(
                    f"target_parameters {params} are not supported; only mlp.experts.gate_up_proj / down_proj"
                )
            targets = [*(targets or ()), *(m for n in names for m in PEFT_EXPERT_PARAMETERS[n])]
            extra["peft_target_parameters"] = tuple(names)
        return cls(
            rank=int(config["r"]),
            alpha=float(config.get("lora_alpha", config["r"])),
            target_modules=tuple(dict.fromkeys(targets or ())),
            use_rslora=bool(config.get("use_rslora", False)),
            extra=extra,
        )
