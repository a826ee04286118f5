"""The Tinker service's link to the catalog: every training run is a policy, every
`save_weights*` a revision with provenance, so the CLI and /catalog/v1 see what the SDK made.

Runs on the engine thread (blocking database and store I/O stays off the event loop).
A run's policy is named by its `user_metadata["policy"]` (`name`, or `owner/name` for an owner
the tenant may write), else automatically `<tenant>/tinker-<session>-train-<n>`; its
`tinker_run_id` is the model id, which is how saves find it (so `lorafleet adapters rename`
does not break a live run).
Training-state saves publish kind `state` (weights + optimizer), sampler saves kind `sampler`;
both carry their `tinker://` path so `catalog.resolve("tinker://...")` finds them.
External exports are copies of the weights for download and are not published again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from lorafleet.api.tinker.checkpoints import OPTIMIZER_NAME, TinkerPath
from lorafleet.lora.spec import LoraSpec

log = logging.getLogger("lorafleet.tinker.catalog")


POLICY_KEY = "policy"  # user_metadata key that names a run's policy


def policy_name(tenant: str, model_id: str) -> str:
    """The automatic name of a run's policy (when its user_metadata names none)."""
    return f"{tenant}/tinker-{model_id.replace(':', '-')}"[:129]


def run_policy_name(tenant: str, model_id: str, user_metadata: dict[str, Any] | None) -> str:
    """The policy a new run publishes into; InvalidRequest for a malformed name or an owner
    the tenant may not write (checked when the run is requested, before any work)."""
    from lorafleet.catalog.records import Principal
    from lorafleet.catalog.refs import parse_policy_name
    from lorafleet.errors import InvalidRequest

    chosen = str((user_metadata or {}).get(POLICY_KEY) or "").strip()
    if not chosen:
        return policy_name(tenant, model_id)
    name = chosen if "/" in chosen else f"{tenant}/{chosen}"
    owner, _ = parse_policy_name(name)
    if not Principal(tenant).can_write(owner):
        raise InvalidRequest(f"user_metadata policy {chosen!r}: tenant {tenant!r} cannot create policies of {owner!r}")
    return name


def inherited_metadata(user_metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    """A run loaded from another run's checkpoint keeps its metadata but not its policy name
    (that policy belongs to the other run): it gets its own, unless it names one itself."""
    if not user_metadata:
        return user_metadata
    return {k: v for k, v in user_metadata.items() if k != POLICY_KEY}


@dataclass(frozen=True, slots=True)
class CatalogCheckpoint:
    """A catalog revision seen as a Tinker checkpoint (see `CatalogBridge.fetch`)."""

    owner: str
    base_model: str
    base_digest: str | None
    revision_id: str
    files: dict[str, Any]  # filename -> BlobRef
    adapter_config: bytes
    public: bool


class CatalogBridge:
    """Thin adapter over `lorafleet.catalog.service.Catalog` for the Tinker runner."""

    def __init__(self, catalog: Any) -> None:
        self.catalog = catalog

    def _who(self, tenant: str) -> Any:
        from lorafleet.catalog.records import Principal

        return Principal(tenant)

    def create_run(self, tenant: str, model_id: str, base_name: str, base_digest: str | None,
                   spec: LoraSpec, user_metadata: dict[str, Any] | None,
                   parent_path: str | None = None) -> None:
        meta = {str(k): str(v) for k, v in (user_metadata or {}).items()}
        self.catalog.create_policy(
            self._who(tenant), run_policy_name(tenant, model_id, user_metadata), base_name, spec,
            base_digest=base_digest, metadata=meta, tinker_run_id=model_id,
            parent=parent_path if parent_path and self._resolves(tenant, parent_path) else None,
        )

    def _resolves(self, tenant: str, ref: str) -> bool:
        try:
            self.catalog.resolve(ref, self._who(tenant))
            return True
        except Exception:
            return False

    def publish(self, tenant: str, path: TinkerPath, files: dict[str, bytes],
                meta: dict[str, Any], ttl_s: float | None = None, on_commit: Any = None) -> str | None:
        """Publish one checkpoint as a revision; returns the revision id (None: not published).
        `on_commit(conn, revision)` runs in the revision's transaction (the checkpoint's row)."""
        from lorafleet.catalog.records import Provenance, RevisionKind
        from lorafleet.catalog.service import OPTIMIZER_FILE

        if path.kind == "external":
            return None
        kind = RevisionKind.STATE if path.kind == "training" else RevisionKind.SAMPLER
        out = dict(files)
        if OPTIMIZER_NAME in out and OPTIMIZER_NAME != OPTIMIZER_FILE:
            out[OPTIMIZER_FILE] = out.pop(OPTIMIZER_NAME)
        loss = meta.get("loss") or {}
        parent = meta.get("parent")
        prov = Provenance(
            parent_revision_id=parent if parent and self._resolves(tenant, parent) else None,
            loss_fn=loss.get("loss_fn"), loss_config=loss.get("loss_config"),
            optimizer_config=meta.get("optimizer"), data_digest=meta.get("batches_digest"),
            code_version=meta.get("code_version"),
        )
        who = self._who(tenant)
        rev = self.catalog.publish(
            who, self.catalog.policy_for_run(who, path.model_id).full_name, out, kind=kind,
            step=meta.get("step"), provenance=prov, tinker_path=str(path),
            expires_at=datetime.now(UTC) + timedelta(seconds=ttl_s) if ttl_s else None,
            on_commit=on_commit,
        )
        return rev.id

    def fetch(self, tenant: str, path: TinkerPath) -> CatalogCheckpoint | None:
        """A revision with this tinker path that `tenant` may read but that has no Tinker row
        (published before the Tinker state moved into the catalog); None when there is none."""
        from lorafleet.errors import InvalidRequest, NotFound

        who = self._who(tenant)
        try:
            rev = self.catalog.resolve(str(path), who)
            policy = self.catalog.get_policy(who, rev.policy)
            manifest = self.catalog.manifest(who, str(path))
            config = self.catalog.store.get(manifest.as_dict()["adapter_config.json"])
        except (NotFound, InvalidRequest, KeyError):
            return None
        return CatalogCheckpoint(policy.owner, policy.base_model, policy.base_digest, rev.id,
                                 manifest.as_dict(), config, policy.public)

    def delete(self, tenant: str, path: str) -> None:
        try:
            self.catalog.delete_revision(self._who(tenant), path)
        except Exception as e:  # not published (external) or already gone
            log.info("catalog: not deleting %s: %s", path, e)
