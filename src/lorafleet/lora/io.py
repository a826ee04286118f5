"""PEFT adapter files: the only code that reads or writes them.

A PEFT LoRA directory is `adapter_config.json` + `adapter_model.safetensors` whose keys are
`base_model.model.<module path>.lora_A.weight` ([r, in]) and `.lora_B.weight` ([out, r]).
Whatever we export loads in PEFT (and so vLLM/SGLang) unchanged; any PEFT LoRA for a
supported base and target modules imports.

MoE adapters have two layouts (lorafleet/lora/packed.py): `per_expert` (the default export,
PEFT/vLLM naming `...mlp.experts.{e}.gate_proj.lora_A.weight`) and `packed` (one
`...mlp.experts.gate_proj.lora_A.weight` [E, r, in] per layer and projection, marked in the
safetensors metadata). Import accepts either, and PEFT's `target_parameters` form.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from lorafleet.errors import IncompatibleAdapter, InvalidRequest
from lorafleet.lora import packed as moe_layout
from lorafleet.lora.spec import MLP_MODULES as MLP_NAMES
from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.weights import LoraWeights

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."
_KEY = re.compile(r"\Abase_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight\Z")
# PEFT target_parameters wrappers on the fused expert tensors: `...mlp.experts[.base_layer]`
_PARAM_WRAPPER = re.compile(r"\A.+\.experts(?:\.base_layer)*\Z")


@dataclass(frozen=True, slots=True)
class PeftAdapter:
    """A parsed PEFT directory: its spec, the base it names, and its weights (fp32)."""

    spec: LoraSpec
    base_model: str | None
    weights: LoraWeights

    @property
    def tensors(self) -> dict[str, Tensor]:
        """Flat PEFT-keyed tensors, as in `adapter_model.safetensors`."""
        return to_peft_tensors(self.weights)


def to_peft_tensors(weights: LoraWeights, layout: str = moe_layout.PER_EXPERT) -> dict[str, Tensor]:
    """Flat PEFT-keyed fp32 tensors; routed-expert LoRA per expert (default) or packed."""
    if layout not in moe_layout.LAYOUTS:
        raise InvalidRequest(f"unknown adapter layout {layout!r}; use one of {list(moe_layout.LAYOUTS)}")
    pairs = weights.pairs if layout == moe_layout.PACKED else moe_layout.unpack_experts(weights.pairs)
    out: dict[str, Tensor] = {}
    for path, (a, b) in pairs.items():
        out[f"{_PREFIX}{path}.lora_A.weight"] = a.detach().to(torch.float32).contiguous()
        out[f"{_PREFIX}{path}.lora_B.weight"] = b.detach().to(torch.float32).contiguous()
    return out


def from_peft_tensors(spec: LoraSpec, tensors: dict[str, Tensor]) -> LoraWeights:
    """Pair up lora_A / lora_B tensors by module path; refuse unknown or unpaired keys.

    Routed-expert tensors may come per expert or packed (never both in one adapter); they
    are held packed. Expert counts and shapes are checked against a base by `LoraWeights.checked`.
    """
    halves: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise IncompatibleAdapter(f"unexpected tensor {key!r} in a LoRA adapter")
        halves.setdefault(m.group(1), {})[m.group(2)] = value
    wrapped = {p: ab for p, ab in halves.items() if _PARAM_WRAPPER.match(p) and "peft_target_parameters" in spec.extra}
    pairs = {}
    for path, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise IncompatibleAdapter(f"{path}: lora_A and lora_B must both be present")
        if path in wrapped:
            continue
        want_ndim = 3 if ab["A"].ndim == 3 and moe_layout.PACKED_PATH.match(path) else 2
        if ab["A"].ndim != want_ndim or ab["B"].ndim != want_ndim:
            raise IncompatibleAdapter(
                f"{path}: lora_A/lora_B must be 2-D matrices (or [experts, r, d] packed expert tensors), "
                f"got {tuple(ab['A'].shape)} / {tuple(ab['B'].shape)}"
            )
        if ab["A"].shape[-2] != spec.rank or ab["B"].shape[-1] != spec.rank:
            raise IncompatibleAdapter(
                f"{path}: tensors have rank {ab['A'].shape[-2]}/{ab['B'].shape[-1]} but the config says r={spec.rank}"
            )
        pairs[path] = (ab["A"].to(torch.float32), ab["B"].to(torch.float32))
    moe_layout.layout_of(list(pairs), [a.ndim for a, _ in pairs.values()])
    pairs = moe_layout.pack_experts(pairs)
    if wrapped:
        found = {p: (ab["A"].to(torch.float32), ab["B"].to(torch.float32)) for p, ab in wrapped.items()}
        pairs |= moe_layout.from_peft_param_wrappers(found, spec.rank, spec.extra["peft_target_parameters"])
    if not pairs:
        raise IncompatibleAdapter("the adapter holds no LoRA tensors")
    return LoraWeights(spec, pairs)


def peft_files(weights: LoraWeights, base_model: str, layout: str = moe_layout.PER_EXPERT) -> dict[str, bytes]:
    """The canonical bytes of a PEFT directory for `weights` (same weights -> same bytes).

    `layout="packed"` writes routed-expert LoRA as one [E, r, d] tensor per layer, projection
    and A/B (lorafleet's serving layout, see lora/packed.py); adapters without routed-expert
    tensors give the same bytes in both layouts.
    """
    config = json.dumps(weights.spec.to_peft_config(base_model), indent=2, sort_keys=True) + "\n"
    tensors = to_peft_tensors(weights, layout)
    metadata = {"format": "pt"}
    packed = [a for p, (a, _) in weights.pairs.items() if moe_layout.is_packed_pair(p, a)]
    if layout == moe_layout.PACKED and packed:
        metadata |= {moe_layout.LAYOUT_KEY: moe_layout.PACKED_LAYOUT_V1, moe_layout.EXPERTS_KEY: str(packed[0].shape[0])}
    return {
        CONFIG_NAME: config.encode(),
        WEIGHTS_NAME: _sorted_metadata(st_save(tensors, metadata=metadata)),
    }


def _sorted_metadata(data: bytes) -> bytes:
    """Safetensors bytes with the `__metadata__` keys sorted: safetensors writes them in hash
    order, which differs between calls, and equal adapters must have equal bytes (digests)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if len(header.get("__metadata__") or {}) < 2:
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n, "re-serialised safetensors header grew"
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n :]


def peft_param_files(weights: LoraWeights, base_model: str) -> dict[str, bytes]:
    """A PEFT directory PEFT 0.21 can load on transformers 5 MoE bases (fused 3-D experts).

    Routed-expert LoRA goes through `target_parameters` on `mlp.experts.gate_up_proj` /
    `down_proj` (see lora/packed.py `to_peft_param_wrappers`); with both gate and up targeted
    the file has rank 2r and alpha 2 * alpha (alpha * sqrt(2) with rsLoRA), the same function.
    Not one of our layouts: re-importing gives that rank-2r adapter, not the original tensors.
    Router LoRA cannot be expressed (PEFT cannot wrap the router) and is refused.
    """
    if any(p.endswith(".mlp.gate") for p in weights.pairs):
        raise IncompatibleAdapter("PEFT cannot load a router (`gate`) LoRA on this base; export without it")
    spec = weights.spec
    pairs, rank, names = moe_layout.to_peft_param_wrappers(weights.pairs, spec.rank)
    factor = rank / spec.rank
    config = spec.to_peft_config(base_model)
    # MLP names that also sit on plain Linear layers (a shared expert, the dense layers of a mixed stack)
    shared = {p.rsplit(".", 1)[1] for p, (a, _) in weights.pairs.items() if not moe_layout.is_packed_pair(p, a)}
    config["target_modules"] = [m for m in spec.target_modules if m not in MLP_NAMES or m in shared]
    config["r"] = rank
    config["lora_alpha"] = spec.alpha * (math.sqrt(factor) if spec.use_rslora else factor)
    if names:
        config["target_parameters"] = [f"mlp.experts.{n}" for n in names]
    tensors = {}
    for path, (a, b) in pairs.items():
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = a.detach().to(torch.float32).contiguous()
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = b.detach().to(torch.float32).contiguous()
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    return {CONFIG_NAME: text.encode(), WEIGHTS_NAME: st_save(tensors, metadata={"format": "pt"})}


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes ({} when absent or unreadable).

    Decodes only the metadata object, not the whole header: a per-expert MoE header lists
    tens of thousands of tensors and parsing all of it would cost more than loading them.
    """
    if len(data) < 8:
        return {}
    header = data[8 : 8 + int.from_bytes(data[:8], "little")]
    at = header.find(b'"__metadata__"')
    if at < 0:
        return {}
    try:
        # the metadata object is small; do not decode a per-expert header's megabyte of entries
        text = header[at + len(b'"__metadata__"') : at + 65536].decode(errors="replace").lstrip()
        meta, _ = json.JSONDecoder().raw_decode(text.removeprefix(":").lstrip())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _check_layout_metadata(meta: dict[str, str], tensors: dict[str, Tensor]) -> None:
    """A file that says it is packed must hold only packed expert tensors of the stated count."""
    if meta.get(moe_layout.LAYOUT_KEY) is None:
        return
    if meta[moe_layout.LAYOUT_KEY] != moe_layout.PACKED_LAYOUT_V1:
        raise IncompatibleAdapter(f"unknown adapter layout {meta[moe_layout.LAYOUT_KEY]!r} in {WEIGHTS_NAME}")
    paths = [k.removeprefix(_PREFIX).rsplit(".lora_", 1)[0] for k in tensors]
    if any(moe_layout.PER_EXPERT_PATH.match(p) for p in paths):
        raise IncompatibleAdapter(
            f"{WEIGHTS_NAME} says it is packed but holds per-expert tensors: mixed layouts in one file"
        )
    n = meta.get(moe_layout.EXPERTS_KEY)
    counts = {int(t.shape[0]) for k, t in tensors.items() if t.ndim == 3}
    if n is not None and counts and counts != {int(n)}:
        raise IncompatibleAdapter(f"{WEIGHTS_NAME}: metadata says {n} experts, tensors hold {sorted(counts)}")


def parse_peft_files(files: dict[str, bytes]) -> PeftAdapter:
    """Parse the bytes of a PEFT directory (as stored in the catalog)."""
    if CONFIG_NAME not in files:
        raise IncompatibleAdapter(f"missing {CONFIG_NAME}")
    try:
        config = json.loads(files[CONFIG_NAME])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IncompatibleAdapter(f"{CONFIG_NAME} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise IncompatibleAdapter(f"{CONFIG_NAME} must hold a JSON object")
    spec = LoraSpec.from_peft_config(config)
    if WEIGHTS_NAME in files:
        try:
            tensors = st_load(files[WEIGHTS_NAME])
        except (SafetensorError, Exception) as e:  # safetensors raises several types on bad bytes
            raise IncompatibleAdapter(f"{WEIGHTS_NAME} is not a readable safetensors file: {e}") from e
        _check_layout_metadata(safetensors_metadata(files[WEIGHTS_NAME]), tensors)
    elif LEGACY_WEIGHTS_NAME in files:
        import io

        try:
            tensors = torch.load(io.BytesIO(files[LEGACY_WEIGHTS_NAME]), weights_only=True, map_location="cpu")
        except Exception as e:
            raise IncompatibleAdapter(f"{LEGACY_WEIGHTS_NAME} is not readable: {e}") from e
    else:
        raise IncompatibleAdapter(f"missing {WEIGHTS_NAME}")
    return PeftAdapter(spec, config.get("base_model_name_or_path"), from_peft_tensors(spec, tensors))


def read_peft_dir(path: str | Path) -> PeftAdapter:
    """Read a PEFT LoRA directory from disk."""
    root = Path(path)
    if not root.is_dir():
        raise InvalidRequest(f"{root} is not a directory")
    names = (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME)
    return parse_peft_files({n: (root / n).read_bytes() for n in names if (root / n).is_file()})


def write_peft_dir(
    weights: LoraWeights, base_model: str, path: str | Path, layout: str = moe_layout.PER_EXPERT
) -> Path:
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for name, data in peft_files(weights, base_model, layout).items():
        (root / name).write_bytes(data)
    return root
