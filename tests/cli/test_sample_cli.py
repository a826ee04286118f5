import os
import subprocess
import sys

from lorafleet.lora.io import write_peft_dir
from lorafleet.lora.spec import LoraSpec
from tests.conftest import TEST_HOME
from tests.helpers import random_adapter


def _run(*args):
    env = dict(os.environ, LORAFLEET_HOME=str(TEST_HOME), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lorafleet", *args], capture_output=True, text=True, env=env, timeout=300)


def test_sample_prints_a_completion_with_and_without_adapter(tiny_base, tmp_path):
    spec = LoraSpec(rank=4, alpha=64)
    write_peft_dir(random_adapter(tiny_base.info, spec, seed=1, b_scale=1.0), tiny_base.name, tmp_path / "a")
    base = _run("sample", "--base", "lorafleet/tiny-llama", "--prompt", "Hello there", "--max-tokens", "8")
    tuned = _run("sample", "--base", "lorafleet/tiny-llama", "--adapter", str(tmp_path / "a"), "--prompt", "Hello there", "--max-tokens", "8")
    assert base.returncode == 0 and tuned.returncode == 0, base.stderr + tuned.stderr
    assert base.stdout.strip() and tuned.stdout.strip() != base.stdout.strip()
    again = _run("sample", "--base", "lorafleet/tiny-llama", "--prompt", "Hello there", "--max-tokens", "8")
    assert again.stdout == base.stdout  # greedy by default


def test_sample_reports_bad_input_without_a_traceback(tmp_path):
    out = _run("sample", "--base", "nope/model", "--prompt", "x")
    assert out.returncode == 2 and "unknown base model 'nope/model'" in out.stderr and "Traceback" not in out.stderr
    out = _run("sample", "--base", "lorafleet/tiny-llama", "--adapter", str(tmp_path), "--prompt", "x")
    assert out.returncode == 2 and "missing adapter_config.json" in out.stderr
