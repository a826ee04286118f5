"""Loading a base streams its safetensors into the model: the process's anonymous memory never
holds two copies of the weights (checked in a fresh process, sampling RssAnon while it loads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lorafleet.model import smollm2
from tests.conftest import TEST_HOME

PROBE = """
import sys, threading, time
def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) * 1024
from lorafleet.config import paths_from_env
from lorafleet.model.registry import load_base
peak, done = [0], threading.Event()
def poll():
    while not done.is_set():
        peak[0] = max(peak[0], anon()); time.sleep(0.002)
start = anon(); t = threading.Thread(target=poll); t.start()
base = load_base(sys.argv[1], paths_from_env(), dtype=sys.argv[2])
done.set(); t.join()
size = sum(p.numel() * p.element_size() for p in base.model.parameters())
print(peak[0] - start, size)
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory, paths):
    """A ~280 MB fp32 Llama (untied 49k embeddings, hidden 512, 6 layers)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.for_model("llama", vocab_size=49152, hidden_size=512, intermediate_size=1536,
                               num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                               tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("big") / "llama"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(smollm2.tokenizer_dir(paths.models_dir))).save_pretrained(str(out))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_never_holds_two_copies(folder, dtype):
    env = dict(os.environ, LORAFLEET_HOME=str(TEST_HOME), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PROBE, str(folder), dtype], capture_output=True, text=True,
                         env=env, timeout=300, check=True)
    peak, size = json.loads("[" + out.stdout.split("\n")[-2].replace(" ", ",") + "]")
    file_bytes = (folder / "model.safetensors").stat().st_size
    assert size > 130e6
    # the loaded weights plus a fixed allowance (tokenizer, meta model, allocator), never the
    # file's tensors and the model's at once (that would be size + file_bytes more)
    assert peak < size + 256 * 2**20, (peak, size, file_bytes)
