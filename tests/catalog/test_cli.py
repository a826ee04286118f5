"""The catalog CLI end to end, on a real PEFT adapter saved by `peft` for lorafleet/tiny-llama."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest

from lorafleet.cli import main

BASE = "lorafleet/tiny-llama"


@pytest.fixture(scope="module")
def peft_dir(tiny_base, tmp_path_factory):
    """A LoRA saved by PEFT itself (r=4 on q_proj/v_proj), with non-zero B so it is non-trivial."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(tiny_base.model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = BASE
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """Run `lorafleet ...` in-process with a fresh home; returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LORAFLEET_DATABASE_URL", raising=False)
    monkeypatch.delenv("LORAFLEET_STORE_URL", raising=False)

    def run(*argv: str, ok: bool = True):
        code = main(list(argv))
        out, err = capsys.readouterr()
        if ok:
            assert code == 0, err
        return code, out, err

    return run


def _json(run, *argv):
    return json.loads(run(*argv, "--json")[1])


def test_manage_adapters_end_to_end(cli, peft_dir, tmp_path):
    rev1 = _json(cli, "adapters", "import", str(peft_dir), "--name", "alice/math", "--alias", "prod")
    _, text, _ = cli("adapters", "import", str(peft_dir), "--name", "alice/math")
    assert "revision 2" in text
    assert _json(cli, "adapters", "ls")["items"][0]["full_name"] == "alice/math"
    assert "alice/math" in cli("adapters", "ls", "--owner", "alice")[1]
    shown = _json(cli, "adapters", "show", "alice/math:prod")
    assert shown["revision"]["id"] == rev1["id"] and shown["policy"]["lora"]["rank"] == 4
    assert set(shown["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert rev1["sha256"] == shown["revision"]["sha256"]

    code, _, err = cli("alias", "set", "alice/math", "prod", "--require", "accuracy>=0.8", ok=False)
    assert code == 2 and "no evaluation" in err
    cli("eval", "record", "alice/math", "--suite", "gsm8k", "--metric", "accuracy=0.9", "--metric", "loss=0.3")
    moved = _json(cli, "alias", "set", "alice/math", "prod", "--require", "accuracy>=0.8")
    assert moved["from_revision_id"] == rev1["id"]
    assert "accuracy=0.9" in cli("adapters", "show", "alice/math")[1]
    hist = _json(cli, "alias", "history", "alice/math:prod")
    assert [e["seq"] for e in hist] == [1, 2]
    back = _json(cli, "rollback", "alice/math:prod")
    assert back["to_revision_id"] == rev1["id"]
    assert "rollback" in cli("alias", "history", "alice/math:prod")[1]
    assert _json(cli, "eval", "compare", rev1["id"], "alice/math")["rows"][0]["b"] == 0.9

    lin = _json(cli, "lineage", "alice/math")
    assert lin["ancestors"] == [] and lin["revision"]["seq"] == 2
    assert _json(cli, "adapters", "visibility", "alice/math", "public")["public"] is True
    key = _json(cli, "keys", "create", "--tenant", "bob")["key"]
    assert key.startswith("tml-")
    assert "deleted 0 expired" in cli("gc")[1]
    assert "0 problems" in cli("fsck")[1]


def test_keys_and_tenants_commands(cli):
    alice = _json(cli, "keys", "create", "--tenant", "alice", "--label", "laptop")["key"]
    _json(cli, "keys", "create", "--tenant", "bob")
    listed = cli("keys", "ls")[1]
    assert "laptop" in listed and alice[:12] in listed and alice not in listed  # never the secret
    [row] = _json(cli, "keys", "ls", "--tenant", "alice")
    assert row["prefix"] == alice[:12] and row["revoked_at"] is None and "key" not in row

    assert "revoked" in cli("keys", "revoke", row["id"])[1]
    assert "already revoked" in cli("keys", "revoke", alice[:10])[1]  # idempotent, by prefix
    assert _json(cli, "keys", "ls", "--tenant", "alice")[0]["revoked_at"] is not None
    code, _, err = cli("keys", "revoke", "key_0123456789abcdef", ok=False)
    assert code == 2 and "no API key" in err

    code, _, err = cli("tenants", "delete", "local", ok=False)
    assert code == 2 and "cannot be deleted" in err
    assert "1 keys revoked" in cli("tenants", "delete", "bob")[1]
    tenants = {x["name"]: x for x in _json(cli, "tenants", "ls")}
    assert tenants["bob"]["deleted_at"] and tenants["bob"]["active_keys"] == 0
    assert not tenants["alice"]["deleted_at"] and "deleted" in cli("tenants", "ls")[1]
    code, _, err = cli("keys", "create", "--tenant", "bob", ok=False)
    assert code == 2 and "never reused" in err
    audit = cli("audit")[1]  # newest first: who, what, which
    assert audit.index("tenant.delete") < audit.index("key.revoke") < audit.index("key.create")
    assert [e["action"] for e in _json(cli, "audit", "--tenant", "alice")] == ["key.revoke", "key.create"]

def test_cli_reports_bad_input_clearly(cli, peft_dir, tmp_path):
    code, _, err = cli("adapters", "show", "alice/math:Prod", ok=False)
    assert code == 2 and "invalid alias" in err
    code, _, err = cli("adapters", "show", "alice/nothing", ok=False)
    assert code == 2 and "no revision" in err
    code, _, err = cli("adapters", "import", str(tmp_path / "nope"), "--name", "a/b", ok=False)
    assert code == 2 and "not a directory" in err

    broken = tmp_path / "no-weights"
    shutil.copytree(peft_dir, broken)
    (broken / "adapter_model.safetensors").unlink()
    code, _, err = cli("adapters", "import", str(broken), "--name", "a/b", ok=False)
    assert code == 2 and "adapter_model.safetensors" in err

    wrong_rank = tmp_path / "wrong-rank"
    shutil.copytree(peft_dir, wrong_rank)
    cfg = json.loads((wrong_rank / "adapter_config.json").read_text())
    (wrong_rank / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    code, _, err = cli("adapters", "import", str(wrong_rank), "--name", "a/b", ok=False)
    assert code == 2 and "rank" in err

    other_base = tmp_path / "other-base"  # tiny-llama shapes claimed for a wider base
    shutil.copytree(peft_dir, other_base)
    (other_base / "adapter_config.json").write_text(
        json.dumps({**cfg, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    code, _, err = cli("adapters", "import", str(other_base), "--name", "a/b", ok=False)
    assert code == 2 and "do not fit" in err

    code, _, err = cli("eval", "record", "a/b", "--suite", "s", "--metric", "acc", ok=False)
    assert code == 2 and "KEY=VALUE" in err
    assert _json(cli, "adapters", "ls")["items"] == []  # nothing half-created


def test_cli_subprocess_entry_point(tmp_path):
    env = {**os.environ, "LORAFLEET_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    env.pop("LORAFLEET_DATABASE_URL", None)
    res = subprocess.run([sys.executable, "-c", "import sys; from lorafleet.cli import main; sys.exit(main())",
                          "adapters", "ls", "--json"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"items": [], "next_cursor": None}
