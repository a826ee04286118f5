"""The CLI frictions of a first hour (issue 12): `adapters import --base`, `adapters export`,
`adapters rename`, `sample --adapter <catalog reference>`, and no migration chatter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lorafleet.lora.io import read_peft_dir, write_peft_dir
from lorafleet.lora.spec import LoraSpec
from tests.conftest import TEST_HOME
from tests.helpers import random_adapter

BASE = "lorafleet/tiny-llama"


def _env(home) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    return env | {"LORAFLEET_HOME": str(home), "OMP_NUM_THREADS": "1"}


def _lf(env, *args, ok: bool = True):
    out = subprocess.run([sys.executable, "-m", "lorafleet", *args], capture_output=True, text=True,
                         env=env, timeout=300)
    if ok:
        assert out.returncode == 0, out.stderr
    return out


@pytest.fixture(scope="module")
def local_peft_dir(tiny_base, tmp_path_factory):
    """A PEFT folder as trainers write it: base_model_name_or_path is a local path."""
    out = tmp_path_factory.mktemp("peft") / "adapter"
    write_peft_dir(random_adapter(tiny_base.info, LoraSpec(rank=4, alpha=8), seed=3, b_scale=1.0), BASE, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/models/tiny-llama"
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_import_base_export_rename_and_sample_by_reference(local_peft_dir, tmp_path):
    env = _env(tmp_path / "home")
    # the models are cached in the test home; the catalog is this test's own
    env["LORAFLEET_HOME"] = str(TEST_HOME)
    env["LORAFLEET_DATABASE_URL"] = f"sqlite:///{tmp_path / 'catalog.db'}"
    env["LORAFLEET_STORE_URL"] = str(tmp_path / "store")

    refused = _lf(env, "adapters", "import", str(local_peft_dir), "--name", "alice/x", ok=False)
    assert refused.returncode == 2 and "/models/tiny-llama" in refused.stderr and "--base" in refused.stderr
    rev = json.loads(_lf(env, "adapters", "import", str(local_peft_dir), "--name", "alice/x",
                         "--base", BASE, "--alias", "prod", "--json").stdout)

    out = tmp_path / "exported"
    _lf(env, "adapters", "export", "alice/x:prod", str(out))
    exported = read_peft_dir(out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert exported.base_model == BASE and exported.spec.rank == 4
    again = _lf(env, "adapters", "export", "alice/x", str(out), ok=False)
    assert again.returncode == 2 and "not an empty folder" in again.stderr

    renamed = _lf(env, "adapters", "rename", "alice/x", "alice/y", "--json")
    assert json.loads(renamed.stdout)["full_name"] == "alice/y"
    shown = json.loads(_lf(env, "adapters", "show", "alice/y:prod", "--json").stdout)
    assert shown["revision"]["id"] == rev["id"]  # revisions and aliases moved with it
    gone = _lf(env, "adapters", "show", "alice/x", ok=False)
    assert gone.returncode == 2 and "alice/x" in gone.stderr

    by_ref = _lf(env, "sample", "--adapter", "alice/y:prod", "--prompt", "Hello there", "--max-tokens", "8")
    by_dir = _lf(env, "sample", "--base", BASE, "--adapter", str(out), "--prompt", "Hello there",
                 "--max-tokens", "8")
    plain = _lf(env, "sample", "--base", BASE, "--prompt", "Hello there", "--max-tokens", "8")
    assert by_ref.stdout == by_dir.stdout != plain.stdout
    missing = _lf(env, "sample", "--adapter", "alice/nope:prod", "--prompt", "x", ok=False)
    assert missing.returncode == 2 and "alice/nope" in missing.stderr and "Traceback" not in missing.stderr


def test_catalog_commands_log_a_migration_once_and_nothing_else(tmp_path):
    env = _env(tmp_path / "home")
    first = _lf(env, "adapters", "ls")
    second = _lf(env, "adapters", "ls")
    assert "alembic" not in first.stderr + second.stderr
    assert first.stderr.count("migrating schema") == 1, first.stderr
    assert second.stderr == ""


def test_no_progress_bar_escapes_when_stderr_is_a_file():
    """SmolLM2 loads through transformers, whose weight-loading bar would write \\r updates."""
    env = _env(TEST_HOME)
    out = _lf(env, "sample", "--prompt", "Hi", "--max-tokens", "1")
    assert "loaded base HuggingFaceTB/SmolLM2-135M-Instruct" in out.stderr
    assert "\r" not in out.stderr and "\x1b" not in out.stderr, repr(out.stderr[:300])


def test_serve_on_a_taken_port_fails_without_saying_it_serves(tmp_path):
    import socket

    env = _env(tmp_path / "home")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "models").symlink_to(TEST_HOME / "models", target_is_directory=True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _lf(env, "serve", "--base", BASE, "--port", str(port), ok=False)
    assert out.returncode != 0
    assert "address already in use" in out.stderr.lower(), out.stderr[-2000:]
    assert "serving" not in out.stderr, out.stderr[-2000:]


def test_catalog_commands_do_not_import_torch():
    """Every CLI call paid torch's import (seconds) through `lorafleet sample`'s module."""
    code = ("import sys; from lorafleet.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
