"""Checkpoints of the Tinker service: rows in the catalog database, bytes once in its blob store,
paths checked by the one strict parser, and `lorafleet fsck` over both (issue 10's C1 and fsck
items; issue 16's one persistence stack)."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import insert

from lorafleet.api.tinker.checkpoints import Checkpoints, TinkerPath, parse_path
from lorafleet.api.tinker.repo import TinkerRepo, now
from lorafleet.api.tinker.state import check_state, open_state
from lorafleet.catalog.tinker_tables import tinker_checkpoints
from lorafleet.cli import main
from lorafleet.errors import Conflict, InvalidRequest, NotFound

FILES = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"w"}


@pytest.fixture
def ckpts(catalog):
    return Checkpoints(TinkerRepo(catalog.db), catalog.store)


def _blobs(catalog) -> set[str]:
    return {sha for sha, _ in catalog.store.list_blobs()}


def _legacy_row(ckpts: Checkpoints, tinker_path: str) -> None:
    """A row as an older server could store it, before paths were checked (no files)."""
    with ckpts.repo.db.write() as conn:
        conn.execute(insert(tinker_checkpoints).values(
            tinker_path=tinker_path, tenant="t", model_id="m", kind="training", name="n", size_bytes=1,
            public=False, expires_at=None, created=now(), user_metadata=None, meta=None))


@pytest.mark.parametrize("bad", [("..", "training", "x"), ("r", "training", ".."),
                                 ("r", "training", "."), ("r/x", "training", "y"),
                                 ("r", "training", "x\n"), ("", "training", "x"),
                                 ("r", "nope", "x"), ("r", "training", "a\x00")])
def test_a_tinker_path_cannot_be_built_with_unsafe_segments(bad):
    with pytest.raises(InvalidRequest):
        TinkerPath(*bad)
    with pytest.raises(InvalidRequest):
        parse_path(f"tinker://{bad[0]}/{'weights' if bad[1] == 'training' else bad[1]}/{bad[2]}")


def test_checkpoint_bytes_are_stored_once_in_the_catalog_store(catalog, ckpts, tmp_path):
    a = TinkerPath("r:train:0", "training", "a")
    row = ckpts.write("t", a, FILES, {"step": 1}, user_metadata={"k": "v"})
    assert row["size_bytes"] == sum(map(len, FILES.values())) and row["revision_id"] is None
    assert ckpts.read_files(ckpts.find("t", a)) == FILES
    assert len(_blobs(catalog)) == 2
    ckpts.write("t", TinkerPath("r:train:0", "sampler", "same-bytes"), FILES, {})
    assert len(_blobs(catalog)) == 2  # content-addressed: one copy
    assert not any(p.name == "checkpoints" for p in tmp_path.rglob("*"))  # no second folder
    with pytest.raises(Conflict, match="immutable"):
        ckpts.write("t", a, {"adapter_model.safetensors": b"other"}, {})
    with pytest.raises(NotFound):  # another tenant's, until published
        ckpts.find("u", a)
    ckpts.set_public("t", str(a), True)
    assert ckpts.find("u", a)["public"] is True
    ckpts.set_public("t", str(a), False)
    with pytest.raises(NotFound):
        ckpts.find("u", a)
    with pytest.raises(NotFound):  # only the owner may change it
        ckpts.set_public("u", str(a), True)


def test_delete_and_ttl_drop_rows_and_gc_frees_only_unreferenced_blobs(catalog, ckpts):
    keep = TinkerPath("r:train:0", "training", "keep")
    ckpts.write("t", keep, FILES, {})
    gone = TinkerPath("r:train:0", "training", "gone")
    ckpts.write("t", gone, {**FILES, "adapter_model.safetensors": b"only mine"}, {})
    ttl = TinkerPath("r:train:0", "external", "ttl")
    ckpts.write("t", ttl, {"adapter_model.safetensors": b"short-lived"}, {}, ttl_s=60)
    assert len(_blobs(catalog)) == 4
    with pytest.raises(NotFound):
        ckpts.delete("u", gone)  # another tenant's delete answers like a missing checkpoint
    ckpts.delete("t", gone)
    with pytest.raises(NotFound):
        ckpts.find("t", gone)
    assert catalog.gc(grace_s=0).blobs_deleted == 1  # "only mine"; shared and live blobs stay
    ckpts.set_ttl("t", str(ttl), 0.001)
    time.sleep(0.01)
    with pytest.raises(NotFound, match="expired"):
        ckpts.find("t", ttl)
    assert catalog.gc(grace_s=0).blobs_deleted == 1
    assert ckpts.read_files(ckpts.find("t", keep)) == FILES


def test_fsck_checks_tinker_rows_against_the_store(catalog, ckpts, tmp_path, monkeypatch, capsys):
    ok = ckpts.write("t", TinkerPath("r:train:0", "training", "ok"), FILES, {})
    damaged = ckpts.write("t", TinkerPath("r:train:0", "sampler", "damaged"),
                          {"adapter_model.safetensors": b"to be truncated"}, {})
    ref = ckpts.repo.checkpoint_files(damaged["tinker_path"])["adapter_model.safetensors"]
    catalog.store.path(ref.sha256).write_bytes(b"trunc")
    _legacy_row(ckpts, "tinker://../weights/..")
    report = check_state(catalog, tmp_path / "no-such-state")
    assert report.checkpoints_checked == 3 and not report.ok
    text = "\n".join(report.problems)
    assert f"{damaged['tinker_path']} file adapter_model.safetensors" in text
    assert "tinker://../weights/.." in text and "invalid training run id" in text and "has no files" in text
    assert ok["tinker_path"] not in text and len(report.problems) == 3

    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORAFLEET_DATABASE_URL", catalog.db.url.render_as_string(hide_password=False))
    monkeypatch.setenv("LORAFLEET_STORE_URL", catalog.store.url)
    assert main(["fsck"]) == 1
    assert "3 Tinker checkpoints checked, 3 problems" in capsys.readouterr().out
    assert main(["fsck", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and len(data["tinker"]["problems"]) == 3


def test_a_crash_before_the_row_commits_leaves_only_unreferenced_blobs(catalog, ckpts, tmp_path,
                                                                      monkeypatch, capsys):
    """SIGKILL after a checkpoint's blobs are written but before its row commits: invisible,
    fsck stays clean, a retry writes it, and gc collects what no row names."""
    path = TinkerPath("r:train:0", "sampler", "w1")
    catalog.store.put(b"half a write ago")  # what the killed writer left
    report = check_state(catalog, None)
    assert report.ok and report.checkpoints_checked == 0
    with pytest.raises(NotFound):
        ckpts.find("t", path)
    ckpts.write("t", path, FILES, {})
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORAFLEET_DATABASE_URL", catalog.db.url.render_as_string(hide_password=False))
    monkeypatch.setenv("LORAFLEET_STORE_URL", catalog.store.url)
    assert main(["fsck"]) == 0
    out = capsys.readouterr().out
    assert "1 Tinker checkpoints checked, 0 problems" in out and "1 unreferenced blobs" in out
    assert catalog.gc(grace_s=0).blobs_deleted == 1
    assert ckpts.read_files(ckpts.find("t", path)) == FILES


def test_an_old_state_folder_is_refused_with_what_to_do(catalog, tmp_path, monkeypatch, capsys):
    old = tmp_path / "tinker"
    old.mkdir()
    (old / "tinker.db").write_bytes(b"SQLite format 3\x00")
    with pytest.raises(InvalidRequest) as info:
        open_state(catalog, old)
    message = str(info.value)
    assert f"mv {old} {old}.pre-0004" in message and "docs/operations.md" in message
    assert "tinker:// paths" in message  # what survives the move
    assert not check_state(catalog, old).ok  # and fsck says so too
    state = open_state(catalog, tmp_path / "fresh")  # a new home starts
    state.close()
