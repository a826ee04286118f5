"""`lorafleet models ls | show`: registered bases, cached repos, and what a base is."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from lorafleet.model import smollm2
from lorafleet.model.registry import folder_digest
from tests.conftest import TEST_HOME
from tests.model.families import save_family


def _run(*args, **env):
    env = dict(os.environ, LORAFLEET_HOME=str(TEST_HOME), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-m", "lorafleet", "models", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, paths):
    return save_family("phi3", tmp_path_factory.mktemp("cli") / "phi", smollm2.tokenizer_dir(paths.models_dir))


def test_show_describes_a_folder_base(folder):
    out = _run("show", str(folder), "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["name"] == str(folder) and d["architecture"] == "phi3" and d["dtype"] == "float32"
    assert d["digest"] == folder_digest(folder) and d["max_context"] == 512 and d["layers"] == 2
    assert d["lora_sites"]["qkv_proj"] == {"sites": 2, "shape": [64 + 2 * 32, 64]}
    text = _run("show", str(folder))
    assert "qkv_proj" in text.stdout and "Phi-3" in text.stdout and d["digest"] in text.stdout


def test_ls_lists_registered_bases_and_cached_repos(folder, tmp_path):
    repo = tmp_path / "hub" / "models--acme--phi"
    shutil.copytree(folder, repo / "snapshots" / "abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    out = _run("ls", "--json", HF_HUB_CACHE=str(tmp_path / "hub"))
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert {"HuggingFaceTB/SmolLM2-135M-Instruct", "lorafleet/tiny-llama", "lorafleet/tiny-moe", "acme/phi"} <= set(rows)
    assert rows["acme/phi"]["architecture"] == "phi3" and rows["acme/phi"]["source"].startswith("hf_cache ")


def test_show_of_a_broken_folder_is_an_error_without_a_traceback(folder, tmp_path):
    bad = shutil.copytree(folder, tmp_path / "bad")
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    out = _run("show", str(bad))
    assert out.returncode == 2 and "architecture 'bert' is not supported" in out.stderr
    assert "Traceback" not in out.stderr
