"""Checkpoint folders of the Tinker service: derived from checked paths, kept under the root,
and checked by `lorafleet fsck` (issue 10: C1 and the fsck item)."""

from __future__ import annotations

import json

import pytest

from lorafleet.api.tinker.checkpoints import Checkpoints, TinkerPath, check_state, parse_path
from lorafleet.api.tinker.store import TinkerStore, now
from lorafleet.cli import main
from lorafleet.errors import InvalidRequest, NotFound

FILES = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"w"}


@pytest.fixture
def state(tmp_path):
    store = TinkerStore(tmp_path / "state" / "tinker.db")
    yield tmp_path / "state", Checkpoints(store, tmp_path / "state" / "checkpoints")
    store.close()


def _legacy_row(ckpts: Checkpoints, tinker_path: str, folder) -> None:
    """A row as an older server could store it, before paths were checked."""
    ckpts.store.insert("checkpoints", {
        "tinker_path": tinker_path, "tenant": "t", "model_id": "m", "kind": "training",
        "name": "n", "dir": str(folder), "size_bytes": 1, "public": 0, "expires_at": None,
        "created": now(), "user_metadata": None, "meta": None})


@pytest.mark.parametrize("bad", [("..", "training", "x"), ("r", "training", ".."),
                                 ("r", "training", "."), ("r/x", "training", "y"),
                                 ("r", "training", "x\n"), ("", "training", "x"),
                                 ("r", "nope", "x"), ("r", "training", "a\x00")])
def test_a_tinker_path_cannot_be_built_with_unsafe_segments(bad):
    with pytest.raises(InvalidRequest):
        TinkerPath(*bad)
    with pytest.raises(InvalidRequest):
        parse_path(f"tinker://{bad[0]}/{'weights' if bad[1] == 'training' else bad[1]}/{bad[2]}")


def test_write_refuses_a_folder_that_resolves_outside_the_root(state, tmp_path):
    _, ckpts = state
    outside = tmp_path / "outside"
    outside.mkdir()
    (ckpts.root / "run").symlink_to(outside)
    with pytest.raises(InvalidRequest, match="does not map to a folder"):
        ckpts.write("t", TinkerPath("run", "training", "x"), FILES, {})
    assert list(outside.iterdir()) == [] and not ckpts.exists(TinkerPath("run", "training", "x"))


def test_delete_removes_only_the_checkpoints_own_folder(state, tmp_path):
    home, ckpts = state
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    _legacy_row(ckpts, "tinker://r/weights/n", victim)  # a row whose dir points elsewhere
    _legacy_row(ckpts, "tinker://../weights/..", home)  # a row with a traversal path
    ckpts.delete("t", "tinker://r/weights/n")
    ckpts.delete("t", "tinker://../weights/..")
    assert (victim / "keep").is_file() and (home / "tinker.db").is_file()
    assert ckpts.store.select("SELECT * FROM checkpoints") == []


def test_fsck_checks_tinker_rows_against_folders(state, tmp_path, monkeypatch, capsys):
    home, ckpts = state
    ok = ckpts.write("t", TinkerPath("r:train:0", "training", "ok"), FILES, {})
    gone = ckpts.write("t", TinkerPath("r:train:0", "sampler", "gone"), FILES, {})
    ckpts.folder(parse_path(gone["tinker_path"])).rename(tmp_path / "moved")
    stray = ckpts.root / "r:train:0" / "weights" / "stray"
    stray.mkdir()
    _legacy_row(ckpts, "tinker://../weights/..", home)
    _legacy_row(ckpts, "tinker://r:train:0/weights/elsewhere", tmp_path)

    report = ckpts.check()
    assert report.checkpoints_checked == 4 and not report.ok
    text = "\n".join(report.problems)
    assert f"{gone['tinker_path']}: folder" in text and "is missing" in text
    assert str(stray) not in text and report.orphan_folders == 1  # a crash's leftover: counted
    assert "tinker://../weights/.." in text and "invalid training run id" in text
    assert f"recorded folder {tmp_path} is not its folder" in text
    assert ok["tinker_path"] not in text
    assert len(report.problems) == 4  # the misplaced row's folder is missing too

    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LORAFLEET_DATABASE_URL", raising=False)
    monkeypatch.delenv("LORAFLEET_STORE_URL", raising=False)
    assert main(["fsck", "--state-dir", str(home)]) == 1
    out = capsys.readouterr().out
    assert "4 Tinker checkpoints checked, 4 problems" in out and "1 folders without a row" in out
    assert main(["fsck", "--state-dir", str(home), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and len(data["tinker"]["problems"]) == 4


def test_fsck_of_a_clean_state_passes_and_a_missing_one_is_skipped(state, tmp_path, monkeypatch, capsys):
    home, ckpts = state
    ckpts.write("t", TinkerPath("r:train:0", "training", "ok"), FILES, {})
    assert check_state(home).ok and check_state(tmp_path / "none") is None
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LORAFLEET_DATABASE_URL", raising=False)
    monkeypatch.delenv("LORAFLEET_STORE_URL", raising=False)
    assert main(["fsck", "--state-dir", str(home)]) == 0
    assert "1 Tinker checkpoints checked, 0 problems" in capsys.readouterr().out
    assert main(["fsck"]) == 0  # no Tinker state in this home: catalog only
    assert "Tinker" not in capsys.readouterr().out


def test_a_crash_between_rename_and_row_leaves_a_harmless_orphan(state):
    """SIGKILL after a checkpoint folder's rename but before its row (tests/e2e/
    test_crash_consistency.py found it): invisible, fsck stays clean, a retry replaces it."""
    home, ckpts = state
    path = TinkerPath("r:train:0", "sampler", "w1")
    final = ckpts.folder(path)
    final.mkdir(parents=True)
    (final / "adapter_model.safetensors").write_bytes(b"half a write ago")
    report = ckpts.check()
    assert report.ok and report.orphan_folders == 1
    with pytest.raises(NotFound):
        ckpts.find("t", path)
    ckpts.write("t", path, FILES, {})
    assert ckpts.check().orphan_folders == 0
    assert ckpts.read_files(ckpts.find("t", path))["adapter_model.safetensors"] != b"half a write ago"
