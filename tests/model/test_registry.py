import subprocess
import sys
import time

import pytest
import torch

from lorafleet.errors import UnknownBaseModel
from lorafleet.model import DEFAULT_BASE, base_info, list_bases, load_base


def test_registry_lists_the_three_bases():
    assert list_bases() == [DEFAULT_BASE, "lorafleet/tiny-llama", "lorafleet/tiny-moe"]


def test_unknown_base_is_a_typed_error(paths):
    with pytest.raises(UnknownBaseModel, match="unknown base model 'nope/x'"):
        load_base("nope/x", paths)
    with pytest.raises(UnknownBaseModel, match="unknown dtype"):
        load_base("lorafleet/tiny-llama", paths, dtype="float8")


def test_smollm2_info_matches_the_loaded_model(smol_base):
    info = base_info(DEFAULT_BASE)
    assert (info.num_layers, info.vocab_size, info.max_context) == (30, 49152, 8192)
    q = smol_base.model.model.layers[0].self_attn.q_proj
    assert tuple(q.weight.shape) == info.module_shapes["q_proj"] == (576, 576)
    assert smol_base.digest == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_cached_smollm2_loads_fast_and_frozen(smol_base, paths):
    start = time.perf_counter()
    base = load_base(DEFAULT_BASE, paths)
    assert time.perf_counter() - start < 5  # "well under 2 s" on an idle machine; CI is shared
    assert not any(p.requires_grad for p in base.model.parameters())
    assert (base.tokenizer_dir / "tokenizer.json").exists()


@pytest.mark.parametrize("name", [DEFAULT_BASE, "lorafleet/tiny-llama"])
def test_a_base_without_weights_has_everything_else(name, paths):
    full, bare = load_base(name, paths), load_base(name, paths, dtype="bf16", weights=False)
    assert all(p.is_meta for p in bare.model.parameters())
    assert sum(p.numel() for p in bare.model.parameters()) == sum(p.numel() for p in full.model.parameters())
    assert (bare.name, bare.digest, bare.info, bare.eos_token_id) == (full.name, full.digest, full.info, full.eos_token_id)
    assert bare.dtype == torch.bfloat16
    assert bare.tokenizer.encode("Paris is") == full.tokenizer.encode("Paris is")


def test_bf16_is_selectable(paths):
    base = load_base("lorafleet/tiny-llama", paths, dtype="bf16")
    assert base.dtype == torch.bfloat16


def _digest_of_weights(name: str) -> str:
    code = (
        "import hashlib,sys; from lorafleet.model import load_base; from lorafleet.config import paths_from_env;"
        f"m = load_base({name!r}, paths_from_env()).model; h = hashlib.sha256();"
        "[h.update(v.numpy().tobytes()) for _, v in sorted(m.state_dict().items())]; print(h.hexdigest())"
    )
    from tests.conftest import TEST_HOME

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"LORAFLEET_HOME": str(TEST_HOME), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    return out.stdout.strip()


@pytest.mark.parametrize("name", ["lorafleet/tiny-llama", "lorafleet/tiny-moe"])
def test_tiny_models_are_identical_in_every_process(name):
    assert _digest_of_weights(name) == _digest_of_weights(name)
