"""Checkpoint files of the Tinker service: training state, sampler weights, external exports.

A checkpoint is a folder of standard PEFT files (`adapter_config.json`,
`adapter_model.safetensors`), plus `optimizer_state.safetensors` for training state and
`tinker_meta.json` (provenance, LoRA flags). Folders are written to a temporary name and
renamed, then the row is inserted: a reader never sees a half-written checkpoint. Paths
follow the SDK: `tinker://<model_id>/<weights|sampler_weights|external_weights>/<name>`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.api.tinker.store import TinkerStore, now
from lorafleet.errors import Conflict, InvalidRequest, NotFound

KIND_SEGMENT = {"training": "weights", "sampler": "sampler_weights", "external": "external_weights"}
SEGMENT_KIND = {v: k for k, v in KIND_SEGMENT.items()}
META_NAME = "tinker_meta.json"
OPTIMIZER_NAME = "optimizer_state.safetensors"  # the catalog's name for it too
_NAME = re.compile(r"^[A-Za-z0-9._\-]{1,128}$")


@dataclass(frozen=True, slots=True)
class TinkerPath:
    """A parsed `tinker://<run>/<segment>/<name>` path."""

    model_id: str
    kind: str  # training | sampler | external
    name: str

    @property
    def checkpoint_id(self) -> str:
        return f"{KIND_SEGMENT[self.kind]}/{self.name}"

    def __str__(self) -> str:
        return f"tinker://{self.model_id}/{self.checkpoint_id}"


def parse_path(path: str) -> TinkerPath:
    if not isinstance(path, str) or not path.startswith("tinker://"):
        raise InvalidRequest(f"not a tinker:// path: {path!r}")
    parts = path[len("tinker://"):].split("/")
    if len(parts) != 3 or parts[1] not in SEGMENT_KIND or not parts[0] or not parts[2]:
        raise InvalidRequest(
            f"invalid tinker path {path!r}: expected tinker://<run>/<weights|sampler_weights|"
            "external_weights>/<name>"
        )
    return TinkerPath(parts[0], SEGMENT_KIND[parts[1]], parts[2])


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name in {".", ".."}:
        raise InvalidRequest(f"checkpoint name {name!r} must be 1-128 of [A-Za-z0-9._-]")
    return name


class Checkpoints:
    """Writes, finds, lists and deletes checkpoint folders under `root`."""

    def __init__(self, store: TinkerStore, root: Path) -> None:
        self.store = store
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

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
        final = self.root / _safe(path.model_id) / KIND_SEGMENT[path.kind] / path.name
        tmp = final.parent / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        for rel, data in {**files, META_NAME: json.dumps(meta, indent=2).encode()}.items():
            (tmp / rel).write_bytes(data)
        if final.exists():  # leftover of a crash before the row was written
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
        folder = Path(row["dir"])
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

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
        row = self.store.get("checkpoints", "tinker_path", str(path))
        if row is None or row["tenant"] != tenant:
            raise NotFound(f"checkpoint {path} not found")
        self.store.execute("DELETE FROM checkpoints WHERE tinker_path = ?", str(path))
        shutil.rmtree(row["dir"], ignore_errors=True)

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


def _safe(model_id: str) -> str:
    return model_id.replace("/", "_")
