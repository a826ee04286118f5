"""Checkpoints of the Tinker service: training state, sampler weights, external exports.

A checkpoint is a set of standard PEFT files (`adapter_config.json`,
`adapter_model.safetensors`), plus `optimizer_state.safetensors` for training state, stored
once, as blobs of the catalog's store. Its row (`tinker_checkpoints`, with provenance and LoRA
flags in `meta`) and the list of its blobs (`tinker_checkpoint_files`) live in the catalog's
database; a training or sampler checkpoint is also a catalog revision, committed in the same
transaction as its row (`write(..., publish=...)`). Blobs are written and fsynced first, so a
reader never sees a half-written checkpoint and a crash leaves at most unreferenced blobs,
which the catalog's gc removes.

Paths follow the SDK: `tinker://<model_id>/<weights|sampler_weights|external_weights>/<name>`,
parsed by the catalog's one strict parser (`catalog/refs.py`) wherever they come from, the SDK
or a catalog revision. They name rows, never folders: no path reaches the disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from lorafleet.api.tinker.repo import TinkerRepo, now
from lorafleet.catalog.maintenance import blob_problem
from lorafleet.catalog.refs import (  # the one parser of tinker paths, shared with the catalog
    KIND_SEGMENT,
    SEGMENT_KIND,
    TinkerPath,
    check_checkpoint_name,
    parse_tinker_path,
)
from lorafleet.errors import Conflict, Corrupt, InvalidRequest, NotFound
from lorafleet.store.blobs import BlobStore
from lorafleet.store.manifest import BlobRef, Manifest

__all__ = ["KIND_SEGMENT", "SEGMENT_KIND", "Checkpoints", "TinkerPath", "check_name", "parse_path"]

OPTIMIZER_NAME = "optimizer_state.safetensors"  # the catalog's name for it too
check_name = check_checkpoint_name
parse_path = parse_tinker_path
# publish(files, on_commit): commits a catalog revision, calling on_commit(conn, revision) in
# its transaction (see catalog_bridge.CatalogBridge.publish)
Publish = Callable[[dict[str, bytes], Callable[[Connection, Any], None]], Any]


class Checkpoints:
    """Writes, finds, lists and deletes checkpoints: rows in the repository, bytes in the store."""

    def __init__(self, repo: TinkerRepo, store: BlobStore) -> None:
        self.repo = repo
        self.store = store

    def exists(self, path: TinkerPath) -> bool:
        return self.repo.checkpoint(str(path)) is not None

    def write(
        self,
        tenant: str,
        path: TinkerPath,
        files: dict[str, bytes],
        meta: dict[str, Any],
        ttl_s: float | None = None,
        user_metadata: dict[str, str] | None = None,
        publish: Publish | None = None,
    ) -> dict[str, Any]:
        """Store the blobs, then commit the row (with the catalog revision, given `publish`);
        an existing path is never overwritten (Conflict)."""
        if self.exists(path):
            raise Conflict(f"checkpoint {path} already exists; checkpoints are immutable")
        t = now()
        row = {
            "tinker_path": str(path), "tenant": tenant, "model_id": path.model_id,
            "kind": path.kind, "name": path.name, "size_bytes": sum(len(b) for b in files.values()),
            "public": False, "expires_at": t + ttl_s if ttl_s else None, "created": t,
            "user_metadata": user_metadata, "meta": meta, "revision_id": None,
        }
        refs = Manifest.for_bytes(files).as_dict()

        def record(conn: Connection, revision: Any = None) -> None:
            if revision is not None:
                meta["revision_id"] = row["revision_id"] = revision.id
            self.repo.insert_checkpoint(conn, row, refs)

        try:
            if publish is not None:  # the catalog stores the blobs, then one transaction
                publish(files, record)
            else:
                for data in files.values():  # blobs first, fsynced; the row commits only after
                    self.store.put(data)
                with self.repo.db.write() as conn:
                    record(conn)
        except IntegrityError as e:  # a concurrent writer of the same path won
            raise Conflict(f"checkpoint {path} already exists; checkpoints are immutable") from e
        return row

    def adopt(self, tenant: str, path: TinkerPath, files: dict[str, BlobRef], meta: dict[str, Any],
              public: bool, revision_id: str | None) -> None:
        """Record a checkpoint whose blobs are already stored (a catalog revision that has no
        Tinker row, e.g. one published before the Tinker state moved into the catalog)."""
        t = now()
        row = {"tinker_path": str(path), "tenant": tenant, "model_id": path.model_id, "kind": path.kind,
               "name": path.name, "size_bytes": sum(r.size_bytes for r in files.values()),
               "public": public, "expires_at": None, "created": t, "user_metadata": None,
               "meta": meta, "revision_id": revision_id}
        try:
            with self.repo.db.write() as conn:
                self.repo.insert_checkpoint(conn, row, files)
        except IntegrityError:  # a concurrent request adopted it first
            pass

    def find(self, tenant: str, path: TinkerPath | str) -> dict[str, Any]:
        """The row of a checkpoint this tenant may read (its own, or a published one)."""
        key = str(path)
        row = self.repo.checkpoint(key)
        if row is None or (row["tenant"] != tenant and not row["public"]):
            raise NotFound(f"checkpoint {key} not found")
        if row["expires_at"] is not None and row["expires_at"] < now():
            self.repo.delete_checkpoint(key)
            raise NotFound(f"checkpoint {key} expired")
        return row

    def file_names(self, row: dict[str, Any]) -> list[str]:
        return sorted(self.repo.checkpoint_files(row["tinker_path"]))

    def read_file(self, row: dict[str, Any], name: str) -> bytes | None:
        """One file's verified bytes; None when the checkpoint has no such file."""
        ref = self.repo.checkpoint_files(row["tinker_path"]).get(name)
        return None if ref is None else self._get(row, name, ref)

    def read_files(self, row: dict[str, Any]) -> dict[str, bytes]:
        return {name: self._get(row, name, ref)
                for name, ref in self.repo.checkpoint_files(row["tinker_path"]).items()}

    def _get(self, row: dict[str, Any], name: str, ref: BlobRef) -> bytes:
        try:
            return self.store.get(ref)
        except (NotFound, Corrupt) as e:  # a damaged store is the server's fault, never the caller's
            raise RuntimeError(f"checkpoint {row['tinker_path']} file {name}: {e}") from e

    def list(self, tenant: str, model_id: str | None = None) -> list[dict[str, Any]]:
        return self.repo.checkpoints(tenant, model_id)

    def delete(self, tenant: str, path: TinkerPath | str) -> None:
        self._own(tenant, str(path))
        self.repo.delete_checkpoint(str(path))

    def set_public(self, tenant: str, path: str, public: bool) -> None:
        self._own(tenant, path)
        self.repo.update_checkpoint(path, public=bool(public))

    def set_ttl(self, tenant: str, path: str, ttl_s: float | None) -> None:
        self._own(tenant, path)
        self.repo.update_checkpoint(path, expires_at=now() + ttl_s if ttl_s else None)

    def _own(self, tenant: str, path: str) -> dict[str, Any]:
        row = self.repo.checkpoint(path)
        if row is None or row["tenant"] != tenant:
            raise NotFound(f"checkpoint {path} not found")
        return row

    def gc_expired(self) -> list[dict[str, Any]]:
        """Delete the rows of checkpoints past their TTL (their blobs go at the catalog's gc);
        returns the rows deleted."""
        rows = self.repo.expired_checkpoints(now())
        for row in rows:
            self.repo.delete_checkpoint(row["tinker_path"])
        return rows

    def check(self, verify_bytes: bool = True) -> CheckpointReport:
        """fsck of the Tinker checkpoints: every row's path parses and every file's blob is
        present (and, `verify_bytes`, hash-matching). Nothing a crash can leave is a problem:
        blobs are written before the row that names them commits."""
        paths = self.repo.checkpoint_paths()
        problems: list[str] = []
        for path in paths:
            try:
                parse_path(path)
            except InvalidRequest as e:
                problems.append(f"checkpoint row {path!r}: {e}")
        files = self.repo.all_checkpoint_files()
        with_files = {p for p, _, _ in files}
        problems += [f"checkpoint {p} has no files" for p in paths if p not in with_files]
        seen: dict[str, str | None] = {}
        for path, name, ref in files:
            if ref.sha256 not in seen:
                seen[ref.sha256] = blob_problem(self.store, ref, verify_bytes)
            if seen[ref.sha256]:
                problems.append(f"checkpoint {path} file {name}: {seen[ref.sha256]}")
        return CheckpointReport(len(paths), tuple(problems))


@dataclass(frozen=True, slots=True)
class CheckpointReport:
    """What `Checkpoints.check()` found; `ok` means every row's blobs are whole."""

    checkpoints_checked: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems
