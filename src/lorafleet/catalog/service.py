"""Catalog use cases: the Python API behind the CLI, the HTTP routes and the servers.

Every call takes the `Principal` asking. A tenant sees its own policies and public ones;
anything else is reported exactly like a name that does not exist (NotFound), so existence is
never confirmed. Writes need ownership (or admin).

Publishing is ordered for crash safety: blobs are written and fsynced first (store/blobs.py),
then one transaction inserts the revision row, its file rows and any alias moves. A crash
before the commit leaves only unreferenced blobs, which `gc` removes; nobody can resolve a
revision before its row commits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from lorafleet.catalog import maintenance, repo, validate
from lorafleet.catalog.records import (
    LOCAL_TENANT, Alias, AliasEvent, ApiKey, AuditAction, AuditEvent, CheckReport, Comparison, Evaluation, GcReport, Lineage,
    LoraConfig, MetricDelta, Page, Policy, PolicyId, Principal, Provenance, Quotas, Revision, RevisionId,
    RevisionKind, Tenant,
)
from lorafleet.catalog.refs import (
    OWNER_RE, Gate, Ref, RefKind, check_alias, check_run_id, new_id, normalize_tinker_path,
    parse_gate, parse_policy_name, parse_ref, parse_tinker_path,
)
from lorafleet.db import Database, open_database, upgrade
from lorafleet.errors import (
    Conflict, Corrupt, Expired, IncompatibleAdapter, InvalidRequest, NotFound, QuotaExceeded, Unauthorized,
)
from lorafleet.lora.spec import LoraSpec
from lorafleet.store.blobs import BlobStore, open_store
from lorafleet.store.manifest import Manifest

# Re-exported: the file names a revision holds.
from lorafleet.catalog.validate import CONFIG_FILE, OPTIMIZER_FILE, WEIGHTS_FILE  # noqa: E402,F401

if TYPE_CHECKING:
    from lorafleet.lora.weights import LoraWeights

KEY_PREFIX = "tml-"  # the Tinker SDK only accepts keys that start with this
PREFIX_LEN = len(KEY_PREFIX) + 8  # how much of a key is kept in clear, to recognise it


def _now() -> datetime:
    return datetime.now(UTC)


def hash_key(key: str) -> str:
    """Keys are 32 random bytes, so a plain sha256 is enough (no password-style stretching)."""
    return hashlib.sha256(key.encode()).hexdigest()


class Catalog:
    """Policies, revisions, aliases, evaluations, lineage, tenants: over one DB and one store."""

    def __init__(self, db: Database, store: BlobStore, clock: Callable[[], datetime] = _now) -> None:
        self.db = db
        self.store = store
        self.clock = clock
        self.default_quotas = Quotas()  # the server's (lorafleet serve --max-runs ...)

    @classmethod
    def open(cls, database_url: str, store_url: str, *, migrate: bool = True) -> Catalog:
        """Open (and by default migrate to head) the catalog at `database_url`."""
        db = open_database(database_url)
        if migrate:
            upgrade(db)
        cat = cls(db, open_store(store_url))
        with db.write() as conn:
            repo.ensure_tenant(conn, LOCAL_TENANT, cat.clock())
        return cat

    def close(self) -> None:
        self.db.dispose()

    # ---- tenants and keys ---------------------------------------------------------------
    # Keys are only ever stored as sha256 hashes, plus their first PREFIX_LEN characters so an
    # operator can recognise one. There is no key cache: `principal_for_key` is one indexed
    # query per request, so a revoked key or a deleted tenant fails on its very next request.

    def create_tenant(self, name: str) -> None:
        if not OWNER_RE.match(name or ""):
            raise InvalidRequest(f"invalid tenant name {name!r}: 1-64 of [A-Za-z0-9._-]")
        with self.db.write() as conn:
            repo.ensure_tenant(conn, name, self.clock())
            tenant = repo.get_tenant(conn, name)
        if tenant is not None and tenant.deleted_at is not None:
            raise Conflict(f"tenant {name!r} was deleted; tenant names are never reused")

    def create_key(self, tenant: str, label: str | None = None, *, actor: str = LOCAL_TENANT) -> str:
        """A new API key for `tenant` (created if missing). The plaintext is returned once only."""
        self.create_tenant(tenant)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        now, key_hash = self.clock(), hash_key(key)
        with self.db.write() as conn:
            repo.insert_key(conn, key_hash, key[:PREFIX_LEN], tenant, label, now)
            repo.audit(conn, now, actor, tenant, AuditAction.KEY_CREATE, repo.KEY_ID + key_hash[:repo.KEY_ID_HEX],
                       to_value=key[:PREFIX_LEN], reason=label)
        return key

    def principal_for_key(self, key: str) -> Principal:
        """The tenant of a live key of a live tenant; anything else is Unauthorized (401)."""
        with self.db.read() as conn:
            tenant = repo.tenant_for_key(conn, hash_key(key or ""))
        if tenant is None:
            raise Unauthorized("invalid API key")
        return Principal(tenant)

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        """Every key (revoked ones too), oldest first; never their secrets."""
        with self.db.read() as conn:
            if tenant is not None and repo.get_tenant(conn, tenant) is None:
                raise NotFound(f"no tenant {tenant!r}")
            return repo.list_keys(conn, tenant)

    def revoke_key(self, ref: str, *, actor: str = LOCAL_TENANT) -> tuple[ApiKey, bool]:
        """Revoke one key, named by its id (`key_...` as `list_keys` shows, or a unique leading
        part of it), its shown prefix (`tml-...`), or the key itself. Idempotent: returns the key
        and whether this call revoked it (False: it already was)."""
        now = self.clock()
        with self.db.write() as conn:
            key = self._one_key(conn, (ref or "").strip())
            if key.revoked_at is not None:
                return key, False
            repo.revoke_keys(conn, now, key_id=key.id)
            repo.audit(conn, now, actor, key.tenant, AuditAction.KEY_REVOKE, key.id, from_value=key.prefix)
        return dataclasses.replace(key, revoked_at=now), True

    def _one_key(self, conn: Connection, ref: str) -> ApiKey:
        hint = "give a key id (key_...) or prefix (tml-...) as `lorafleet keys ls` shows it"
        if ref.startswith(KEY_PREFIX) and len(ref) > PREFIX_LEN:  # the secret itself
            hits = repo.find_keys(conn, key_hash=hash_key(ref))
            what = "no API key with that secret"
        else:
            marker = next((m for m in (repo.KEY_ID, KEY_PREFIX) if ref.startswith(m)), None)
            if marker is None:
                raise InvalidRequest(f"{ref!r} is not a key id or prefix: {hint}")
            if len(ref) < len(marker) + 4:
                raise InvalidRequest(f"{ref!r} is too short to name a key: {hint}")
            hits = (repo.find_keys(conn, hash_prefix=ref.removeprefix(marker).lower())
                    if marker == repo.KEY_ID else repo.find_keys(conn, prefix=ref))
            what = f"no API key {ref!r}"
        if not hits:
            raise NotFound(f"{what}: {hint}")
        if len(hits) > 1:
            raise InvalidRequest(f"{ref!r} matches {len(hits)} keys ({', '.join(k.id for k in hits)}); "
                                 "give more characters")
        return hits[0]

    def set_quotas(self, tenant: str, **limits: int | None) -> Quotas:
        """Set some of `tenant`'s quotas (max_runs, max_queued, max_adapters: a count >= 0, or
        None for the server's default); returns the tenant's own values."""
        unknown = set(limits) - set(Quotas.__slots__)
        if unknown:
            raise InvalidRequest(f"unknown quotas {sorted(unknown)}; known: {list(Quotas.__slots__)}")
        for name, value in limits.items():
            if value is not None and not 0 <= value < 1 << 31:
                raise InvalidRequest(f"{name} must be in 0..{(1 << 31) - 1}, got {value}")
        with self.db.write() as conn:
            if repo.get_tenant(conn, tenant) is None:
                raise NotFound(f"no tenant {tenant!r}")
            repo.set_tenant_quotas(conn, tenant, limits)
            return repo.tenant_quotas(conn, tenant)

    def quotas_for(self, tenant: str) -> Quotas:
        """The limits in force for `tenant`: its own values over the server's defaults."""
        with self.db.read() as conn:
            return repo.tenant_quotas(conn, tenant).over(self.default_quotas)

    def list_tenants(self) -> list[Tenant]:
        with self.db.read() as conn:
            return repo.list_tenants(conn)

    def get_tenant(self, name: str) -> Tenant:
        with self.db.read() as conn:
            tenant = repo.get_tenant(conn, name)
        if tenant is None:
            raise NotFound(f"no tenant {name!r}")
        return tenant

    def delete_tenant(self, name: str, *, actor: str = LOCAL_TENANT) -> Tenant:
        """Revoke every key of `name` and mark it deleted, in one transaction: it can no longer
        authenticate. Its policies, revisions and Tinker state stay (for an operator to gc).
        Idempotent; the built-in `local` tenant cannot be deleted."""
        if name == LOCAL_TENANT:
            raise InvalidRequest(f"the built-in tenant {LOCAL_TENANT!r} cannot be deleted")
        now = self.clock()
        with self.db.write() as conn:
            before = repo.get_tenant(conn, name)
            if before is None:
                raise NotFound(f"no tenant {name!r}")
            if before.deleted_at is None:
                revoked = repo.revoke_keys(conn, now, tenant=name)
                repo.mark_tenant_deleted(conn, name, now)
                repo.audit(conn, now, actor, name, AuditAction.TENANT_DELETE, name,
                           reason=f"{revoked} keys revoked")
            return repo.get_tenant(conn, name)  # type: ignore[return-value]

    # ---- policies -----------------------------------------------------------------------

    def create_policy(
        self, who: Principal, name: str, base_model: str, lora: LoraConfig | LoraSpec, *,
        base_digest: str | None = None, public: bool = False,
        metadata: Mapping[str, str] | None = None, parent: str | None = None,
        tinker_run_id: str | None = None,
    ) -> Policy:
        """Register `owner/name`. `parent` (a reference) branches it from an existing revision."""
        owner, short = parse_policy_name(name)
        if not who.can_write(owner):
            raise InvalidRequest(f"tenant {who.tenant!r} cannot create policies owned by {owner!r}")
        metadata = validate.check_metadata(metadata or {})
        lora = validate.lora_config(lora)
        if tinker_run_id is not None:
            check_run_id(tinker_run_id)
        parent_id = self.resolve(parent, who).id if parent else None
        policy = Policy(
            id=PolicyId(new_id("pol")), owner=owner, name=short, base_model=base_model,
            base_digest=base_digest, lora=lora, parent_revision_id=parent_id, public=public,
            created_at=self.clock(), metadata=metadata, tinker_run_id=tinker_run_id,
        )
        try:
            with self.db.write() as conn:
                repo.ensure_tenant(conn, owner, policy.created_at)
                limit = repo.tenant_quotas(conn, owner).over(self.default_quotas).max_adapters
                if limit is not None:
                    used = repo.count_policies(conn, owner)
                    if used >= limit:
                        raise QuotaExceeded(f"quota max_adapters={limit} of tenant {owner!r} is reached: it "
                                            f"owns {used} adapters (policies); delete one or raise the quota")
                repo.insert_policy(conn, policy)
        except IntegrityError as e:
            raise Conflict(f"policy {name} already exists (or tinker run {tinker_run_id!r} is taken)") from e
        return policy

    def get_policy(self, who: Principal, name: str) -> Policy:
        owner, short = parse_policy_name(name)
        with self.db.read() as conn:
            return self._visible_policy(conn, who, owner, short, repo.get_policy(conn, owner, short))

    def policy_for_run(self, who: Principal, run_id: str) -> Policy:
        """The policy a Tinker training run (`{session}:train:{n}`) publishes into."""
        with self.db.read() as conn:
            p = repo.get_policy_by_run(conn, run_id)
        if p is None or p.deleted_at or not who.can_see(p.owner, p.public):
            raise NotFound(f"no training run {run_id!r}")
        return p

    def list_policies(
        self, who: Principal, *, owner: str | None = None, base_model: str | None = None,
        metadata: Mapping[str, str] | None = None, query: str | None = None,
        limit: int = 50, cursor: str | None = None,
    ) -> Page[Policy]:
        """Visible policies in creation order; pass `next_cursor` back to get the next page."""
        limit = validate.check_limit(limit)
        with self.db.read() as conn:
            items = repo.list_policies(conn, who, owner=owner, base_model=base_model,
                                       metadata=metadata or {}, query=query, limit=limit, after=cursor)
        return Page(tuple(items), items[-1].id if len(items) == limit else None)

    def set_public(self, who: Principal, name: str, public: bool) -> Policy:
        """Publish (every tenant may read and resolve it) or unpublish a policy."""
        p = self._writable_policy(who, name)
        with self.db.write() as conn:
            repo.set_public(conn, p.id, public)
        return self.get_policy(who, name)

    def rename_policy(self, who: Principal, name: str, new_name: str) -> Policy:
        """Give a policy a new `owner/name` (the caller must be able to write both owners).
        Revisions, aliases and Tinker paths stay; references by the old name stop resolving.
        A name taken by another policy, even a deleted one, is a Conflict."""
        p = self._writable_policy(who, name)
        owner, short = parse_policy_name(new_name)
        if not who.can_write(owner):
            raise InvalidRequest(f"tenant {who.tenant!r} cannot move policies to owner {owner!r}")
        try:
            with self.db.write() as conn:
                repo.ensure_tenant(conn, owner, self.clock())
                repo.rename_policy(conn, p.id, owner, short)
        except IntegrityError as e:
            raise Conflict(f"policy name {new_name} is taken") from e
        return self.get_policy(who, new_name)

    def delete_policy(self, who: Principal, name: str) -> None:
        """Soft delete: the policy and its revisions stop resolving; names are never reused."""
        p = self._writable_policy(who, name)
        now = self.clock()
        with self.db.write() as conn:
            repo.soft_delete_policy(conn, p.id, now)
            repo.audit(conn, now, who.tenant, p.owner, AuditAction.POLICY_DELETE, p.full_name)

    # ---- publishing ---------------------------------------------------------------------

    def publish(
        self, who: Principal, policy: str, files: Mapping[str, bytes], *,
        kind: RevisionKind | str = RevisionKind.SAMPLER, step: int | None = None,
        provenance: Provenance | None = None, tinker_path: str | None = None,
        expires_at: datetime | None = None, aliases: Sequence[str] = (), reason: str | None = None,
        on_commit: Callable[[Connection, Revision], None] | None = None,
    ) -> Revision:
        """Store `files` (filename -> bytes) and commit them as a new immutable revision.

        `provenance.parent_revision_id` may be any reference; it defaults to the policy's
        branch point for the first revision of a branched policy. `aliases` are moved to the
        new revision in the same transaction. `on_commit(conn, revision)` runs in that
        transaction too (the Tinker service records its checkpoint row there: both or neither).
        """
        p = self._writable_policy(who, policy)
        kind = validate.revision_kind(kind)
        validate.check_files(p, kind, files)
        for a in aliases:
            check_alias(a)
        tinker_path = validate.run_path(p, normalize_tinker_path(tinker_path)) if tinker_path else None
        prov = provenance or Provenance()
        parent = self.resolve(prov.parent_revision_id, who).id if prov.parent_revision_id else None
        manifest = Manifest.for_bytes(files)
        for data in files.values():  # blobs first, fsynced; the row commits only after
            self.store.put(data)
        return self._commit_revision(who, p, manifest, kind, step, prov, parent, tinker_path,
                                     expires_at, aliases, reason, on_commit)

    def _commit_revision(
        self, who: Principal, p: Policy, manifest: Manifest, kind: RevisionKind, step: int | None,
        prov: Provenance, parent: str | None, tinker_path: str | None, expires_at: datetime | None,
        aliases: Sequence[str], reason: str | None,
        on_commit: Callable[[Connection, Revision], None] | None = None,
    ) -> Revision:
        now = self.clock()
        try:
            with self.db.write() as conn:
                repo.lock_policy(conn, p.id)
                seq = repo.next_seq(conn, p.id)
                if parent is None and seq == 1:
                    parent = p.parent_revision_id
                rev = Revision(
                    id=RevisionId(new_id("rev")), policy_id=p.id, policy=p.full_name, seq=seq,
                    kind=kind, sha256=manifest.digest, size_bytes=manifest.size_bytes,
                    store_url=self.store.url, step=step,
                    provenance=Provenance(parent, prov.loss_fn, prov.loss_config,  # type: ignore[arg-type]
                                          prov.optimizer_config, prov.data_digest, prov.code_version),
                    created_by=who.tenant, created_at=now, expires_at=expires_at,
                    tinker_path=tinker_path, manifest=manifest,
                )
                repo.insert_revision(conn, rev, manifest)
                for a in aliases:
                    _audit_alias(conn, p, repo.move_alias(conn, p, a, rev.id, action="set", actor=who.tenant,
                                                          reason=reason or "publish", now=now),
                                 AuditAction.ALIAS_SET)
                if on_commit is not None:
                    on_commit(conn, rev)
        except IntegrityError as e:
            if tinker_path:
                raise Conflict(f"tinker path {tinker_path} already names a revision") from e
            raise
        return rev

    def publish_peft_dir(
        self, who: Principal, path: str | Path, policy: str, *, create: bool = True,
        public: bool = False, aliases: Sequence[str] = (), provenance: Provenance | None = None,
        step: int | None = None, base_model: str | None = None,
    ) -> Revision:
        """Import a PEFT LoRA folder; checks it fits its base model (`base_model`, default the
        folder's `base_model_name_or_path`); creates the policy if needed."""
        from lorafleet.catalog.peft import load_peft_dir  # torch is needed on this path only
        from lorafleet.model.registry import base_digest

        adapter = load_peft_dir(Path(path), base_model)
        owner, short = parse_policy_name(policy)
        with self.db.read() as conn:
            existing = repo.get_policy(conn, owner, short)
        if existing is None or existing.deleted_at:
            if not create:
                raise NotFound(f"no policy {policy}")
            self.create_policy(who, policy, adapter.base_model, adapter.spec, public=public,
                               base_digest=base_digest(adapter.base_model))
        elif existing.base_model != adapter.base_model:
            raise IncompatibleAdapter(
                f"{path} is an adapter for {adapter.base_model}; {policy} is on {existing.base_model}")
        return self.publish(who, policy, adapter.files, step=step, provenance=provenance,
                            aliases=aliases, reason="import")

    def publish_weights(self, who: Principal, policy: str, weights: LoraWeights, **kwargs: Any) -> Revision:
        """Publish engine weights (a `LoraWeights`) as PEFT files; `kwargs` as for `publish`,
        plus `optimizer_state` (bytes) for kind=state revisions."""
        from lorafleet.catalog.peft import weights_files

        p = self.get_policy(who, policy)
        files = weights_files(weights, p.base_model)
        optimizer_state = kwargs.pop("optimizer_state", None)
        if optimizer_state is not None:
            files[OPTIMIZER_FILE] = optimizer_state
        return self.publish(who, policy, files, **kwargs)

    def read_files(self, who: Principal, ref: str) -> dict[str, bytes]:
        """The verified bytes of every file of a revision (Corrupt if any blob is damaged)."""
        rev = self.resolve(ref, who)
        with self.db.read() as conn:
            manifest = repo.load_manifest(conn, rev.id)
        out = {name: self.store.get(blob) for name, blob in manifest.files}
        if Manifest.for_bytes(out).digest != rev.sha256:
            raise Corrupt(f"revision {rev.id}: files do not match its sha256")
        return out

    def manifest(self, who: Principal, ref: str) -> Manifest:
        rev = self.resolve(ref, who)
        with self.db.read() as conn:
            return repo.load_manifest(conn, rev.id)

    # ---- resolving ----------------------------------------------------------------------

    def resolve(self, ref: str, who: Principal) -> Revision:
        """The one revision `ref` names now (see catalog/refs.py for the forms)."""
        r = parse_ref(ref)
        with self.db.read() as conn:
            loc = self._locate(conn, r)
        if loc is None or loc.policy_deleted or not who.can_see(loc.owner, loc.public):
            raise NotFound(f"no revision {r.text!r}")
        rev = loc.revision
        if rev.expires_at is not None and rev.expires_at <= self.clock():
            raise Expired(f"revision {rev.id} ({r.text}) expired at {rev.expires_at.isoformat()}")
        return rev

    def _locate(self, conn: Connection, r: Ref) -> repo.Located | None:
        if r.kind is RefKind.TINKER:  # only the run's own policy can hold its paths
            return repo.revision_by_tinker_path(conn, r.value, parse_tinker_path(r.value).model_id)
        if not r.owner:
            return repo.revision_by_id(conn, r.value)
        found = repo.policy_with_alias(conn, r.owner, r.name, r.value)
        if found is None:
            return None
        policy, target = found
        if r.kind is RefKind.ALIAS:
            return None if target is None else repo.revision_by_id(conn, target)
        if r.kind is RefKind.LATEST:
            if target is not None:  # an explicitly set `latest` alias wins
                return repo.revision_by_id(conn, target)
            return repo.latest_revision(conn, policy.id, self.clock())
        column = "id" if r.kind is RefKind.REVISION else "sha256"
        hits = repo.revisions_by_prefix(conn, policy.id, column, r.value, limit=20)
        if len({h.revision.id if column == "id" else h.revision.sha256 for h in hits}) > 1:
            raise InvalidRequest(f"{r.text!r} is ambiguous: it matches several revisions")
        return hits[0] if hits else None  # same bytes published twice: the newest

    def list_revisions(self, who: Principal, policy: str, *, limit: int = 50,
                       cursor: str | None = None) -> Page[Revision]:
        """Newest first. The cursor is the `seq` of the last item seen."""
        p = self.get_policy(who, policy)
        limit = validate.check_limit(limit)
        before = validate.int_cursor(cursor)
        with self.db.read() as conn:
            items = [loc.revision for loc in repo.list_revisions(conn, p.id, limit, before)]
        return Page(tuple(items), str(items[-1].seq) if len(items) == limit else None)

    def delete_revision(self, who: Principal, ref: str) -> None:
        """Delete a revision row (its blobs go at the next gc). Refused while an alias points at it."""
        rev = self.resolve(ref, who)
        self._writable_policy(who, rev.policy)
        with self.db.write() as conn:
            pointing = repo.aliases_pointing_at(conn, rev.id)
            if pointing:
                raise Conflict(f"revision {rev.id} is the target of alias(es) {pointing}; move them first")
            repo.delete_revision(conn, rev.id)
            repo.audit(conn, self.clock(), who.tenant, rev.policy.partition("/")[0],
                       AuditAction.REVISION_DELETE, f"{rev.policy}@{rev.id}", from_value=rev.sha256)

    # ---- aliases ------------------------------------------------------------------------

    def set_alias(self, who: Principal, ref: str, alias: str, *, require: str | Gate | None = None,
                  reason: str | None = None) -> AliasEvent:
        """Point `<policy of ref>:alias` at the revision `ref` names, optionally gated on a metric."""
        check_alias(alias)
        gate = parse_gate(require) if isinstance(require, str) else require
        rev = self.resolve(ref, who)
        p = self._writable_policy(who, rev.policy)
        with self.db.write() as conn:
            repo.lock_policy(conn, p.id)
            if gate is not None:
                validate.check_gate(gate, rev.id, repo.list_evaluations(conn, rev.id))
            event = repo.move_alias(conn, p, alias, rev.id, action="set", actor=who.tenant,
                                    reason=reason or (f"gate {gate}" if gate else None), now=self.clock())
            _audit_alias(conn, p, event, AuditAction.ALIAS_SET)
            return event

    def list_aliases(self, who: Principal, policy: str) -> list[Alias]:
        p = self.get_policy(who, policy)
        with self.db.read() as conn:
            return repo.list_aliases(conn, p)

    def alias_history(self, who: Principal, alias_ref: str) -> list[AliasEvent]:
        p, alias = self._alias_ref(who, alias_ref, write=False)
        with self.db.read() as conn:
            events = repo.alias_history(conn, p, alias)
        if not events:
            raise NotFound(f"no alias {alias_ref!r}")
        return events

    def rollback(self, who: Principal, alias_ref: str, *, to: str | None = None,
                 reason: str | None = None) -> AliasEvent:
        """Move an alias back: to `to` (any reference into the same policy), or else to the target
        it had before its current one (undoing rollbacks as a stack: A, B, C, rollback -> B,
        rollback -> A). Appends an event; never edits a revision."""
        p, alias = self._alias_ref(who, alias_ref, write=True)
        target = self.resolve(to, who) if to else None
        if target is not None and target.policy_id != p.id:
            raise InvalidRequest(f"{to!r} is a revision of {target.policy}, not of {p.full_name}")
        with self.db.write() as conn:
            repo.lock_policy(conn, p.id)
            events = repo.alias_history(conn, p, alias)
            if not events:
                raise NotFound(f"no alias {alias_ref!r}")
            dest = target.id if target else _previous_target(conn, events)
            if dest is None:
                raise Conflict(f"alias {alias_ref} has no earlier target to roll back to")
            event = repo.move_alias(conn, p, alias, dest, action="rollback", actor=who.tenant,
                                    reason=reason, now=self.clock())
            _audit_alias(conn, p, event, AuditAction.ALIAS_ROLLBACK)
            return event

    # ---- audit log ----------------------------------------------------------------------

    def list_audit(self, who: Principal, *, tenant: str | None = None, limit: int = 50,
                   cursor: str | None = None) -> Page[AuditEvent]:
        """Audit events, newest first: a tenant sees its own; admin every tenant's (or `tenant`'s)."""
        limit = validate.check_limit(limit)
        before = validate.int_cursor(cursor)
        if not who.admin:
            if tenant not in (None, who.tenant):
                raise NotFound(f"no tenant {tenant!r}")
            tenant = who.tenant
        with self.db.read() as conn:
            items = repo.list_audit(conn, tenant, limit, before)
        return Page(tuple(items), str(items[-1].id) if len(items) == limit else None)

    def _alias_ref(self, who: Principal, alias_ref: str, write: bool) -> tuple[Policy, str]:
        r = parse_ref(alias_ref)
        if r.kind not in (RefKind.ALIAS, RefKind.LATEST) or ":" not in r.text:
            raise InvalidRequest(f"expected owner/name:alias, got {alias_ref!r}")
        p = self._writable_policy(who, r.policy) if write else self.get_policy(who, r.policy)
        return p, r.value

    # ---- evaluations --------------------------------------------------------------------

    def record_evaluation(self, who: Principal, ref: str, suite: str, metrics: Mapping[str, float],
                          details: Mapping[str, object] | None = None) -> Evaluation:
        if not suite or len(suite) > 128:
            raise InvalidRequest("suite must be a non-empty name of at most 128 characters")
        metrics = validate.check_metrics(metrics)
        rev = self.resolve(ref, who)
        self._writable_policy(who, rev.policy)
        with self.db.write() as conn:
            return repo.insert_evaluation(conn, rev.id, suite, metrics, details or {}, who.tenant, self.clock())

    def list_evaluations(self, who: Principal, ref: str) -> list[Evaluation]:
        rev = self.resolve(ref, who)
        with self.db.read() as conn:
            return repo.list_evaluations(conn, rev.id)

    def compare(self, who: Principal, ref_a: str, ref_b: str) -> Comparison:
        """Each metric of each suite, latest evaluation of each revision, side by side."""
        a, b = self.resolve(ref_a, who), self.resolve(ref_b, who)
        with self.db.read() as conn:
            ea, eb = _latest_metrics(repo.list_evaluations(conn, a.id)), _latest_metrics(repo.list_evaluations(conn, b.id))
        keys = sorted(set(ea) | set(eb))
        return Comparison(a.id, b.id, tuple(MetricDelta(s, m, ea.get((s, m)), eb.get((s, m))) for s, m in keys))

    # ---- lineage ------------------------------------------------------------------------

    def lineage(self, who: Principal, ref: str, *, max_depth: int = 10_000) -> Lineage:
        """Ancestors (parent first) and descendants (breadth first) across policies; revisions
        the caller may not see are left out."""
        rev = self.resolve(ref, who)
        ancestors: list[Revision] = []
        descendants: list[Revision] = []
        with self.db.read() as conn:
            cur, seen = rev.provenance.parent_revision_id, {rev.id}
            while cur and cur not in seen and len(ancestors) < max_depth:
                seen.add(cur)
                loc = repo.revision_by_id(conn, cur)
                if loc is None:
                    break
                if who.can_see(loc.owner, loc.public):
                    ancestors.append(loc.revision)
                cur = loc.revision.provenance.parent_revision_id
            frontier, seen = [rev.id], {rev.id}
            while frontier and len(descendants) < max_depth:
                kids = [k for k in repo.children_of(conn, frontier) if k.revision.id not in seen]
                seen.update(k.revision.id for k in kids)
                descendants += [k.revision for k in kids if who.can_see(k.owner, k.public)]
                frontier = [k.revision.id for k in kids]
        return Lineage(rev, tuple(ancestors), tuple(descendants))

    # ---- maintenance --------------------------------------------------------------------

    def gc(self, *, grace_s: float = 3600.0) -> GcReport:
        """Delete expired revisions no alias points at, then blobs no revision references
        (sparing blobs younger than `grace_s`: they may belong to a publish in flight)."""
        return maintenance.gc(self.db, self.store, self.clock(), grace_s)

    def check(self, *, verify_bytes: bool = True) -> CheckReport:
        """fsck: every revision has files, and every file's blob is present and hash-matching."""
        return maintenance.check(self.db, self.store, verify_bytes)

    # ---- helpers ------------------------------------------------------------------------

    def _visible_policy(self, conn: Connection, who: Principal, owner: str, name: str,
                        p: Policy | None) -> Policy:
        if p is None or p.deleted_at is not None or not who.can_see(p.owner, p.public):
            raise NotFound(f"no policy {owner}/{name}")
        return p

    def _writable_policy(self, who: Principal, name: str) -> Policy:
        p = self.get_policy(who, name)
        if not who.can_write(p.owner):
            raise NotFound(f"no policy {name} owned by tenant {who.tenant!r}")
        return p


def _audit_alias(conn: Connection, p: Policy, e: AliasEvent, action: AuditAction) -> None:
    repo.audit(conn, e.at, e.actor, p.owner, action, f"{p.full_name}:{e.alias}",
               from_value=e.from_revision_id, to_value=e.to_revision_id, reason=e.reason)


def _previous_target(conn: Connection, events: list[AliasEvent]) -> str | None:
    """Replay the history as a stack: `set` pushes, a plain rollback pops."""
    stack: list[str] = []
    for e in events:
        if e.action == "rollback" and len(stack) >= 2 and stack[-2] == e.to_revision_id:
            stack.pop()
        else:
            stack.append(e.to_revision_id)
    while len(stack) >= 2:
        stack.pop()
        if repo.revision_by_id(conn, stack[-1]) is not None:
            return stack[-1]
    return None


def _latest_metrics(evals: list[Evaluation]) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for e in evals:  # oldest first, so later evaluations overwrite
        for m, v in e.metrics.items():
            out[(e.suite, m)] = v
    return out
