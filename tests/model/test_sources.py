"""`--base` as a model folder, a repo in the local Hugging Face cache, or a .gguf file: resolved
offline, identified by the sha256 of the weights, and a clear error for a broken folder."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafleet.errors import UnknownBaseModel
from lorafleet.model import smollm2
from lorafleet.model.registry import base_digest, base_info, canonical_name, folder_digest, load_base
from tests.model.families import config, save_family
from tests.model.tiny_gguf import CHAT_TEMPLATE, VOCAB_SIZE, write_llama_gguf

X = torch.tensor([[1, 50, 23, 31, 45, 2]])


@pytest.fixture(scope="module")
def folder(tmp_path_factory, paths):
    return save_family("llama", tmp_path_factory.mktemp("src") / "tiny", smollm2.tokenizer_dir(paths.models_dir))


def test_a_folder_is_named_by_its_absolute_path_and_loads(folder, paths, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(folder.parent)
    base = load_base("tiny", paths)
    assert base.name == canonical_name("tiny") == str(folder.resolve())
    assert base.tokenizer_dir == folder and base.tokenizer.chat_template  # the folder's own tokenizer
    assert not any(p.requires_grad for p in base.model.parameters())
    want = AutoModelForCausalLM.from_pretrained(str(folder))(input_ids=X).logits
    with torch.no_grad():
        assert torch.equal(base.model(input_ids=X).logits, want)
    assert load_base(str(folder), paths, dtype="bf16").dtype == torch.bfloat16


def test_the_digest_is_the_weights_not_the_name(folder, tmp_path):
    same = shutil.copytree(folder, tmp_path / "copy")
    assert base_digest(str(same)) == base_digest(str(folder))
    other = shutil.copytree(folder, tmp_path / "other")
    tensors = load_file(other / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1e-3
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    assert base_digest(str(other)) != base_digest(str(folder))


def test_the_digest_is_remembered_across_processes(folder, tmp_path):
    import os

    from lorafleet.model import files

    copy = shutil.copytree(folder, tmp_path / "copy")
    memo = tmp_path / "memo"
    want = base_digest(str(folder))
    assert files.sha256_file(copy / "model.safetensors", memo)
    assert len(list(memo.iterdir())) == 1
    files._memo.clear()  # a new process: the memo file answers without reading the weights
    st = (copy / "model.safetensors").stat()
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size
    os.utime(copy / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (copy / "model.safetensors").stat().st_ino == st.st_ino  # rewritten in place: the same key
    assert folder_digest(copy, memo) == want  # remembered, not re-read
    os.utime(copy / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert folder_digest(copy, memo) != want  # a new mtime is a new key


def _break(folder, tmp_path, how: str):
    bad = shutil.copytree(folder, tmp_path / "bad")
    weights = bad / "model.safetensors"
    if how == "no config":
        (bad / "config.json").unlink()
    elif how == "bad json":
        (bad / "config.json").write_text("{ nope")
    elif how == "unsupported":
        (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    elif how == "no weights":
        weights.unlink()
    elif how == "bin only":
        weights.rename(bad / "pytorch_model.bin")
    elif how == "no tokenizer":
        (bad / "tokenizer.json").unlink()
    elif how == "missing shard":
        (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002.safetensors"}}))
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "wrong shapes":
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 128}))
    elif how == "missing tensor":
        tensors = load_file(weights)
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, weights, metadata={"format": "pt"})
    return bad


@pytest.mark.parametrize(("how", "message"), [
    ("no config", "no config.json; a model folder holds config.json"),
    ("bad json", "config.json is not valid JSON"),
    ("unsupported", r"architecture 'gpt2' is not supported; supported: Llama \(llama\), Mistral"),
    ("no weights", r"no \*.safetensors weights"),
    ("bin only", "only PyTorch .bin weights"),
    ("no tokenizer", "no tokenizer"),
    ("missing shard", r"shards \['model-00002.safetensors'\] listed in model.safetensors.index.json are missing"),
    ("truncated", "cannot load the weights"),
    ("wrong shapes", "(do not fit config.json: mismatched_keys|cannot load the weights)"),
    ("missing tensor", r"do not fit config.json: missing_keys \['model.layers.1.mlp.up_proj.weight'\]"),
])
def test_a_broken_folder_is_a_clear_error(folder, tmp_path, paths, how, message):
    bad = _break(folder, tmp_path, how)
    with pytest.raises(UnknownBaseModel, match=message):
        load_base(str(bad), paths)


def test_unknown_names_and_files_are_refused(tmp_path, paths):
    with pytest.raises(UnknownBaseModel, match="unknown base model 'acme/none': not registered"):
        load_base("acme/none", paths)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UnknownBaseModel, match="is a file but not a .gguf"):
        base_info(str(tmp_path / "x.txt"))
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    with pytest.raises(UnknownBaseModel, match="transformers cannot read this GGUF"):
        load_base(str(tmp_path / "x.gguf"), paths)


def test_a_repo_in_the_local_hf_cache_resolves_offline(folder, tmp_path, paths, monkeypatch):
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    shutil.copytree(folder, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = load_base("acme/tiny-llama", paths)
    assert base.name == "acme/tiny-llama" and base.info.source.startswith("hf_cache ")
    assert base.digest == base_digest(str(folder))


def test_a_gguf_file_is_converted_once_and_cached(tmp_path):
    from transformers import AutoModelForCausalLM

    from lorafleet.config import paths_from_env

    paths = paths_from_env({"LORAFLEET_HOME": str(tmp_path / "home")})

    cfg = config("llama")
    cfg.vocab_size = VOCAB_SIZE
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg)
    gguf = write_llama_gguf(hf, tmp_path / "tiny.gguf")
    base = load_base(str(gguf), paths)
    assert base.name == str(gguf) and base.info.arch == "llama"
    assert base.digest == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert base.tokenizer_dir.parent == paths.models_dir and base.tokenizer.chat_template == CHAT_TEMPLATE
    with torch.no_grad():
        assert (base.model(input_ids=X).logits - hf(input_ids=X).logits).abs().max() <= 1e-5
    again = load_base(str(gguf), paths)  # from the cache folder, same weights
    assert again.tokenizer_dir == base.tokenizer_dir and again.digest == base.digest
