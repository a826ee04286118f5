"""Turn a PEFT LoRA folder into revision files, checked against its base model.

The only catalog module that needs torch (through lorafleet.lora.io and model.registry); the
rest of the catalog treats a revision as named bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.errors import IncompatibleAdapter, InvalidRequest
from lorafleet.lora.spec import LoraSpec

# PEFT saves `base_model.model.<module path>.lora_{A,B}.weight`.
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")


@dataclass(frozen=True, slots=True)
class ImportedAdapter:
    spec: LoraSpec
    base_model: str
    base_digest: str | None
    files: dict[str, bytes]  # canonical adapter_config.json + adapter_model.safetensors


def load_peft_dir(path: Path) -> ImportedAdapter:
    """Read, validate against the base model, and re-serialize canonically (so the same adapter
    imported twice has the same sha256)."""
    from lorafleet.lora.io import peft_files, read_peft_dir
    from lorafleet.model.registry import base_info, check_adapter_fits

    if not path.is_dir():
        raise InvalidRequest(f"{path} is not a folder")
    adapter = read_peft_dir(path)
    if not adapter.base_model:
        raise IncompatibleAdapter(f"{path}/adapter_config.json names no base_model_name_or_path")
    info = base_info(adapter.base_model)
    check_adapter_fits(info, adapter.spec, pairs(adapter.tensors))
    files = peft_files(adapter.spec, adapter.base_model, adapter.tensors)
    return ImportedAdapter(adapter.spec, adapter.base_model, getattr(info, "digest", None), dict(files))


def pairs(tensors: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """PEFT state-dict keys -> {module path: (lora_A, lora_B)}; refuses half pairs."""
    if tensors and all(isinstance(v, tuple) for v in tensors.values()):
        return dict(tensors)
    found: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        m = _PEFT_KEY.match(key)
        if not m:
            raise IncompatibleAdapter(f"unexpected tensor {key!r} in adapter (not lora_A/lora_B)")
        found.setdefault(m.group(1), {})[m.group(2)] = value
    out = {}
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise IncompatibleAdapter(f"{module}: has lora_{''.join(ab)} but not its partner")
        out[module] = (ab["A"], ab["B"])
    return out
