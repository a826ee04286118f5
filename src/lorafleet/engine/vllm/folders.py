"""The files vLLM reads: the base model folder and one PEFT folder per registered adapter.

vLLM loads models and adapters from disk. The base folder links lorafleet's cached weights,
config and tokenizer files into one directory (nothing is copied); each adapter is written
from lorafleet's host tier as PEFT files (`lora/io.py` `peft_files`, the bytes the catalog
stores) under a name derived from its immutable revision key, written to a temporary folder
and renamed into place, so vLLM never reads a half-written adapter.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Hashable
from pathlib import Path

from lorafleet.errors import InvalidRequest
from lorafleet.lora.io import peft_files
from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.weights import LoraWeights
from lorafleet.model.registry import LoadedBase

IDENTITY = "lf-identity"  # the zero adapter base-model rows run as on CPU (engine/vllm/defect.py)


def base_folder(base: LoadedBase, root: Path) -> Path:
    """A folder with the base's config, safetensors and tokenizer, for vLLM's `--model`."""
    tok = Path(base.tokenizer_dir)
    model = next((d for d in (tok, tok.parent / "model") if (d / "config.json").is_file()
                  and any(d.glob("*.safetensors"))), None)
    if model is None:
        raise InvalidRequest(f"--sampler vllm needs {base.name}'s weights as a folder with config.json and "
                             f"safetensors (none found at {tok} or {tok.parent / 'model'}); "
                             "use a registered Hugging Face model or a model folder")
    out = root / "base"
    out.mkdir(parents=True, exist_ok=True)
    for src_dir in (model, tok):
        for src in src_dir.iterdir():
            if src.is_file() and src.name not in {"done", "source.json"}:
                link = out / src.name
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(src.resolve())
    return out


class AdapterFolders:
    """PEFT folders of the adapters registered with vLLM, under `root`."""

    def __init__(self, root: Path, base_model: str) -> None:
        self.root = Path(root)
        self.base_model = base_model
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def name(key: Hashable) -> str:
        """vLLM's `lora_name` of a revision key: stable, safe as a folder name."""
        return "lf-" + hashlib.sha256(str(key).encode()).hexdigest()[:20]

    def path(self, key: Hashable) -> Path:
        return self.root / self.name(key)

    def write(self, key: Hashable, weights: LoraWeights) -> Path:
        return self._write(self.path(key), weights)

    def write_identity(self, info, spec: LoraSpec | None = None) -> Path:  # type: ignore[no-untyped-def]
        """A rank-1 adapter whose B is zero: x + 0 == x exactly, the base's own outputs."""
        spec = spec or LoraSpec(rank=1, alpha=1.0, target_modules=("q_proj",))
        return self._write(self.root / IDENTITY, LoraWeights.init(info, spec, seed=0))

    def remove(self, key: Hashable) -> None:
        shutil.rmtree(self.path(key), ignore_errors=True)

    def _write(self, dest: Path, weights: LoraWeights) -> Path:
        if dest.is_dir():
            return dest  # keys are immutable revisions: same key, same bytes
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for fname, data in peft_files(weights, self.base_model).items():
            (tmp / fname).write_bytes(data)
        try:
            tmp.rename(dest)
        except OSError:  # written meanwhile by another activation of the same key
            shutil.rmtree(tmp, ignore_errors=True)
        return dest


__all__ = ["IDENTITY", "AdapterFolders", "base_folder"]
