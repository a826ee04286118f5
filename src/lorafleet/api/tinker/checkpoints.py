"""Checkpoint files of the Tinker service: training state, sampler weights, external exports.

A checkpoint is a folder of standard PEFT files (`adapter_config.json`,
`adapter_model.safetensors`), plus `optimizer_state.safetensors` for training state and
`tinker_meta.json` (provenance, LoRA flags). Folders are written to a temporary name and
renamed, then the row is inserted: a reader never sees a half-written checkpoint. Paths
follow the SDK: `tinker://<model_id>/<weights|sampler_weights|external_weights>/<name>`, and
are parsed by the catalog's one strict parser (`catalog/refs.py`) wherever they come from, the
SDK or a catalog revision; a checkpoint's folder is derived from its path and checked to lie
under the checkpoint root before anything is written or removed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.api.tinker.store import TinkerStore, now
from lorafleet.catalog.refs import (  # the one parser of tinker paths, shared with the catalog
    KIND_SEGMENT,
    SEGMENT_KIND,
    TinkerPath,
    check_checkpoint_name,
    parse_tinker_path,
)
from lorafleet.errors import Conflict, InvalidRequest, NotFound

__all__ = ["KIND_SEGMENT", "SEGMENT_KIND", "Checkpoints", "TinkerPath", "check_name", "parse_path"]

META_NAME = "tinker_meta.json"
OPTIMIZER_NAME = "optimizer_state.safetensors"  # the catalog's name for it too
TMP_PREFIX = ".tmp-"
check_name = check_checkpoint_name
parse_path = parse_tinker_path


class Checkpoints:
    """Writes, finds, lists and deletes checkpoint folders under `root`.

    A checkpoint's folder is `root/<run>/<segment>/<name>`, derived from its checked
    `TinkerPath` by `folder()`, which also proves it lies exactly there (no link or dot
    segment leads out); nothing else is ever written or removed.
    """

    def __init__(self, store: TinkerStore, root: Path) -> None:
        self.store = store
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, path: TinkerPath) -> Path:
        """The folder of `path`, refused unless it resolves to exactly three levels under root."""
        root = self.root.resolve()
        final = (root / path.model_id / KIND_SEGMENT[path.kind] / path.name).resolve()
        if final.parent.parent.parent != root:
            raise InvalidRequest(f"checkpoint {path} does not map to a folder under {root}")
        return final

    def folder_of(self, row: dict[str, Any]) -> Path:
        return self.folder(parse_path(row["tinker_path"]))

    def exists(self, path: TinkerPath) -> bool:
        return self.store.get("checkpoints", "tinker_path", str(path)) is not None

    def write(
        self,
        tenant: str,
        path: TinkerPath,
        files: dict[str, bytes],
        meta: dict[str, Any],
        ttl_s: float | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Write the files, then publish the row; an existing path is never overwritten."""
        if self.exists(path):
            raise Conflict(f"checkpoint {path} already exists; checkpoints are immutable")
        final = self.folder(path)
        tmp = final.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        for rel, data in {**files, META_NAME: json.dumps(meta, indent=2).encode()}.items():
            (tmp / rel).write_bytes(data)
        if final.is_dir():  # leftover of a crash before the row was written
            shutil.rmtree(final)
        os.replace(tmp, final)
        row = {
            "tinker_path": str(path), "tenant": tenant, "model_id": path.model_id,
            "kind": path.kind, "name": path.name, "dir": str(final),
            "size_bytes": sum(len(b) for b in files.values()), "public": 0,
            "expires_at": now() + ttl_s if ttl_s else None, "created": now(),
            "user_metadata": user_metadata, "meta": meta,
        }
        self.store.insert("checkpoints", row)
        return row

    def find(self, tenant: str, path: TinkerPath | str) -> dict[str, Any]:
        """The row of a checkpoint this tenant may read (its own, or a published one)."""
        key = str(path)
        row = self.store.get("checkpoints", "tinker_path", key)
        if row is None or (row["tenant"] != tenant and not row["public"]):
            raise NotFound(f"checkpoint {key} not found")
        if row["expires_at"] is not None and row["expires_at"] < now():
            self.delete(row["tenant"], key)
            raise NotFound(f"checkpoint {key} expired")
        return row

    def read_files(self, row: dict[str, Any]) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in self.folder_of(row).iterdir() if p.is_file()}

    def list(self, tenant: str, model_id: str | None = None) -> list[dict[str, Any]]:
        if model_id is None:
            return self.store.select(
                "SELECT * FROM checkpoints WHERE tenant = ? ORDER BY created", tenant
            )
        return self.store.select(
            "SELECT * FROM checkpoints WHERE tenant = ? AND model_id = ? ORDER BY created",
            tenant, model_id,
        )

    def delete(self, tenant: str, path: TinkerPath | str) -> None:
        row = self._own(tenant, str(path))
        self.store.execute("DELETE FROM checkpoints WHERE tinker_path = ?", str(path))
        try:
            folder = self.folder_of(row)
        except InvalidRequest:  # a row from before paths were checked: it owns no folder
            return
        shutil.rmtree(folder, ignore_errors=True)

    def set_public(self, tenant: str, path: str, public: bool) -> None:
        self._own(tenant, path)
        self.store.update("checkpoints", "tinker_path", path, public=int(public))

    def set_ttl(self, tenant: str, path: str, ttl_s: float | None) -> None:
        self._own(tenant, path)
        self.store.update(
            "checkpoints", "tinker_path", path, expires_at=now() + ttl_s if ttl_s else None
        )

    def _own(self, tenant: str, path: str) -> dict[str, Any]:
        row = self.store.get("checkpoints", "tinker_path", path)
        if row is None or row["tenant"] != tenant:
            raise NotFound(f"checkpoint {path} not found")
        return row

    def gc_expired(self) -> int:
        rows = self.store.select(
            "SELECT * FROM checkpoints WHERE expires_at IS NOT NULL AND expires_at < ?", now()
        )
        for row in rows:
            self.delete(row["tenant"], row["tinker_path"])
        return len(rows)

    def check(self) -> CheckpointReport:
        """fsck of the Tinker state: every row has its folder, under root. A folder under root
        without a row is what a SIGKILL leaves between a write's rename and its row (or between a
        delete's row and its rmtree): invisible to clients and replaced by a retried write, so it
        is counted (`orphan_folders`), not a problem; one that links outside root is a problem."""
        rows = self.store.select("SELECT tinker_path, dir FROM checkpoints")
        problems, expected = [], set()
        for row in rows:
            try:
                folder = self.folder_of(row)
            except InvalidRequest as e:
                problems.append(f"checkpoint row {row['tinker_path']!r}: {e}")
                continue
            expected.add(folder)
            if Path(row["dir"]).resolve() != folder:
                problems.append(f"checkpoint {row['tinker_path']}: recorded folder {row['dir']} "
                                f"is not its folder {folder}")
            if not folder.is_dir():
                problems.append(f"checkpoint {row['tinker_path']}: folder {folder} is missing")
        root = self.root.resolve()
        orphans = 0
        for found in sorted(root.glob("*/*/*")):
            if found.resolve() in expected or found.name.startswith(TMP_PREFIX):
                continue
            if found.is_symlink() or not found.resolve().is_relative_to(root):
                problems.append(f"stray checkpoint folder {found} has no row (links to {found.resolve()})")
            else:
                orphans += 1
        tmp = sum(1 for _ in root.glob(f"*/*/{TMP_PREFIX}*"))
        return CheckpointReport(len(rows), tuple(problems), tmp, orphans)


@dataclass(frozen=True, slots=True)
class CheckpointReport:
    """What `Checkpoints.check()` found; `ok` means every row matches exactly one folder."""

    checkpoints_checked: int
    problems: tuple[str, ...]
    tmp_folders: int  # left by writes that crashed before their rename
    orphan_folders: int = 0  # whole folders without a row: a crash between rename and row

    @property
    def ok(self) -> bool:
        return not self.problems


def check_state(state_dir: Path) -> CheckpointReport | None:
    """`check()` of the Tinker state in `state_dir` (tinker.db, checkpoints/); None if there is none."""
    if not (Path(state_dir) / "tinker.db").is_file():
        return None
    store = TinkerStore(Path(state_dir) / "tinker.db")
    try:
        return Checkpoints(store, Path(state_dir) / "checkpoints").check()
    finally:
        store.close()
