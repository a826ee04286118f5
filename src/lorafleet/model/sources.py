"""What `--base` names: a registry name, a model folder, a model in the local Hugging Face cache,
or a `.gguf` file, resolved offline into a `BaseSource`.

Resolution order: the registry (`lorafleet/tiny-llama`, SmolLM2, ...), then an existing path
(a folder as `save_pretrained` writes it: `config.json` + `*.safetensors` + a tokenizer; or a
`.gguf` file), then a repo id in the local Hugging Face cache (`local_files_only`, never the
network). A folder or file base is named by its absolute path, so the same name resolves in
every process (the catalog checks adapters against it later); a cached repo by its repo id.

Folders are checked before anything heavy is read, and every problem is an UnknownBaseModel
that says which file is wrong or missing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.errors import UnknownBaseModel
from lorafleet.model.architectures import check_supported

REGISTRY = "registry"
FOLDER = "folder"
HF_CACHE = "hf_cache"
GGUF = "gguf"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
HOW = ("a model folder holds config.json, *.safetensors weights and a tokenizer "
       "(tokenizer.json or tokenizer.model), as save_pretrained writes them")


@dataclass(frozen=True, slots=True)
class BaseSource:
    """Where a base's weights come from.

    Args:
        name: the name clients use (registry name, absolute path, or repo id).
        kind: REGISTRY, FOLDER, HF_CACHE or GGUF.
        path: the model folder (FOLDER, HF_CACHE) or the .gguf file (GGUF); None for REGISTRY.
    """

    name: str
    kind: str
    path: Path | None = None

    def describe(self) -> str:
        return self.kind if self.path is None else f"{self.kind} {self.path}"


def resolve(spec: str, registered: list[str]) -> BaseSource:
    """The source `spec` names (see the module doc); UnknownBaseModel if none."""
    if spec in registered:
        return BaseSource(spec, REGISTRY)
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path.resolve()
        check_folder(path)
        return BaseSource(str(path), FOLDER, path)
    if path.is_file():
        path = path.resolve()
        if path.suffix != ".gguf":
            raise UnknownBaseModel(f"{path} is a file but not a .gguf; {HOW}")
        return BaseSource(str(path), GGUF, path)
    snapshot = _hf_cached(spec)
    if snapshot is not None:
        check_folder(snapshot)
        return BaseSource(spec, HF_CACHE, snapshot)
    raise UnknownBaseModel(
        f"unknown base model {spec!r}: not registered ({registered}), no such folder or .gguf file, "
        f"and not in the local Hugging Face cache ({hf_cache_dir()})"
    )


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _hf_cached(repo_id: str) -> Path | None:
    """The snapshot folder of `repo_id` in the local Hugging Face cache, or None. Offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    if repo_id.count("/") != 1:
        return None
    try:
        return Path(snapshot_download(repo_id, cache_dir=hf_cache_dir(), local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a model folder, checked to name a supported architecture."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise UnknownBaseModel(f"{folder}: no config.json; {HOW}")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnknownBaseModel(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise UnknownBaseModel(f"{cfg_path} is not a JSON object")
    check_supported(config.get("model_type"), str(cfg_path))
    return config


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (the shards its index lists, or every one)."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise UnknownBaseModel(f"{index} is not a safetensors index (no weight_map): {e}") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise UnknownBaseModel(f"{folder}: shards {missing} listed in {INDEX_NAME} are missing")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if list(folder.glob("pytorch_model*.bin")):
        raise UnknownBaseModel(
            f"{folder}: only PyTorch .bin weights; lorafleet reads safetensors only "
            "(re-save with save_pretrained, which writes model.safetensors)"
        )
    raise UnknownBaseModel(f"{folder}: no *.safetensors weights; {HOW}")


def check_folder(folder: Path) -> dict[str, Any]:
    """Cheap checks of a model folder (config, weights present, tokenizer); returns its config."""
    config = read_config(folder)
    weight_files(folder)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UnknownBaseModel(f"{folder}: no tokenizer ({' / '.join(TOKENIZER_FILES)}); {HOW}")
    return config
