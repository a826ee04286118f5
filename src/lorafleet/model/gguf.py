"""A `.gguf` base: dequantised once by transformers and cached as a model folder.

transformers marks a GGUF-loaded model as quantised and refuses to save or train it, so its
(dense) tensors are moved into a plain model of the same config (built on the meta device and
assigned, never a second copy) and saved with the GGUF's tokenizer under
`<models_dir>/gguf-<sha256[:16]>/`, which then loads like any model folder.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch

from lorafleet.errors import UnknownBaseModel
from lorafleet.model.architectures import check_supported
from lorafleet.model.files import publish_dir, sha256_file

log = logging.getLogger(__name__)


def cached_folder(gguf: Path, models_dir: Path, memo_dir: Path | None = None) -> Path:
    """The model folder converted from `gguf` (converting it the first time)."""
    digest = sha256_file(gguf, memo_dir)
    final = models_dir / f"gguf-{digest[:16]}"
    if not (final / "done").exists():
        _convert(gguf, digest, final)
    return final


def _convert(gguf: Path, digest: str, final: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once)", gguf)
    try:
        q = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - a bad file fails anywhere in transformers' GGUF reader
        raise UnknownBaseModel(f"{gguf}: transformers cannot read this GGUF: {e}") from None
    fields = q.config.to_dict()
    fields.pop("quantization_config", None)
    model_type = fields.pop("model_type")
    check_supported(model_type, str(gguf))
    cfg = AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(q.state_dict(), strict=True, assign=True)
    del q
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".gguf-"))
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": digest}) + "\n")
    (tmp / "done").write_text("ok\n")
    publish_dir(tmp, final)
