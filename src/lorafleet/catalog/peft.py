"""Turn a PEFT LoRA folder (or engine weights) into revision files, checked against the base.

The only catalog module that needs torch (through lorafleet.lora.io and model.registry); the
rest of the catalog treats a revision as named bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorafleet.errors import IncompatibleAdapter, UnknownBaseModel
from lorafleet.lora.spec import LoraSpec

if TYPE_CHECKING:
    from lorafleet.lora.weights import LoraWeights


@dataclass(frozen=True, slots=True)
class ImportedAdapter:
    spec: LoraSpec
    base_model: str
    files: dict[str, bytes]  # canonical adapter_config.json + adapter_model.safetensors


def load_peft_dir(path: Path, base_model: str | None = None) -> ImportedAdapter:
    """Read a PEFT folder, check it fits its base, and re-serialize it canonically (so the same
    adapter imported twice has the same sha256). `base_model` overrides the folder's
    `base_model_name_or_path` (which is often a local path, e.g. `/models/SmolLM2`)."""
    from lorafleet.lora.io import read_peft_dir

    adapter = read_peft_dir(path)
    base = base_model or adapter.base_model
    if not base:
        raise IncompatibleAdapter(
            f"{path}/adapter_config.json names no base_model_name_or_path: pass the base model")
    try:
        files = weights_files(adapter.weights, base)
    except UnknownBaseModel as e:
        if base_model:
            raise
        raise UnknownBaseModel(f"{path} names base {base!r}, which is not a registered base: pass "
                               f"the base it was trained on (CLI: --base NAME). {e}") from None
    return ImportedAdapter(adapter.spec, base, files)


def weights_files(weights: LoraWeights, base_model: str) -> dict[str, bytes]:
    """PEFT files for in-memory weights, after checking every tensor fits `base_model`."""
    from lorafleet.lora.io import peft_files
    from lorafleet.model.registry import base_info

    return dict(peft_files(weights.checked(base_info(base_model)), base_model))
