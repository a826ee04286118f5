"""PEFT adapter files: the only code that reads or writes them.

A PEFT LoRA directory is `adapter_config.json` + `adapter_model.safetensors` whose keys are
`base_model.model.<module path>.lora_A.weight` ([r, in]) and `.lora_B.weight` ([out, r]).
Whatever we export loads in PEFT (and so vLLM/SGLang) unchanged; any PEFT LoRA for a
supported base and target modules imports.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from lorafleet.errors import IncompatibleAdapter, InvalidRequest
from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.weights import LoraWeights

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


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


def to_peft_tensors(weights: LoraWeights) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for path, (a, b) in weights.pairs.items():
        out[f"{_PREFIX}{path}.lora_A.weight"] = a.detach().to(torch.float32).contiguous()
        out[f"{_PREFIX}{path}.lora_B.weight"] = b.detach().to(torch.float32).contiguous()
    return out


def from_peft_tensors(spec: LoraSpec, tensors: dict[str, Tensor]) -> LoraWeights:
    """Pair up lora_A / lora_B tensors by module path; refuse unknown or unpaired keys."""
    halves: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise IncompatibleAdapter(f"unexpected tensor {key!r} in a LoRA adapter")
        halves.setdefault(m.group(1), {})[m.group(2)] = value
    pairs = {}
    for path, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise IncompatibleAdapter(f"{path}: lora_A and lora_B must both be present")
        if ab["A"].ndim != 2 or ab["B"].ndim != 2:
            raise IncompatibleAdapter(f"{path}: lora_A/lora_B must be 2-D matrices")
        if ab["A"].shape[0] != spec.rank or ab["B"].shape[1] != spec.rank:
            raise IncompatibleAdapter(
                f"{path}: tensors have rank {ab['A'].shape[0]}/{ab['B'].shape[1]} but the config says r={spec.rank}"
            )
        pairs[path] = (ab["A"].to(torch.float32), ab["B"].to(torch.float32))
    if not pairs:
        raise IncompatibleAdapter("the adapter holds no LoRA tensors")
    return LoraWeights(spec, pairs)


def peft_files(weights: LoraWeights, base_model: str) -> dict[str, bytes]:
    """The canonical bytes of a PEFT directory for `weights` (same weights -> same bytes)."""
    config = json.dumps(weights.spec.to_peft_config(base_model), indent=2, sort_keys=True) + "\n"
    return {
        CONFIG_NAME: config.encode(),
        WEIGHTS_NAME: st_save(to_peft_tensors(weights), metadata={"format": "pt"}),
    }


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


def write_peft_dir(weights: LoraWeights, base_model: str, path: str | Path) -> Path:
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for name, data in peft_files(weights, base_model).items():
        (root / name).write_bytes(data)
    return root
