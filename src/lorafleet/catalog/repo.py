"""Catalog queries and writes on an open connection; returns records, never rows.

Every function takes the `Connection` of a transaction the caller (catalog/service.py) opened,
so a use case composes several of them atomically. Lookups used by `resolve` are one indexed
query each and are built once at import time, so SQLAlchemy's statement cache serves them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import JSON, Connection, Row, and_, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from lorafleet.catalog import tables as t
from lorafleet.catalog.records import (
    Alias,
    AliasEvent,
    ApiKey,
    AuditEvent,
    Evaluation,
    LoraConfig,
    Policy,
    PolicyId,
    Principal,
    Provenance,
    Quotas,
    Revision,
    RevisionId,
    RevisionKind,
    Tenant,
)
from lorafleet.store.manifest import BlobRef, Manifest


def utc(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if dt is None:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


# ---- tenants and keys -------------------------------------------------------------------


def ensure_tenant(conn: Connection, name: str, now: datetime) -> None:
    """Create the tenant unless it exists; a concurrent creator winning the race is fine."""
    if conn.execute(select(t.tenants.c.name).where(t.tenants.c.name == name)).first() is not None:
        return
    try:
        with conn.begin_nested():
            conn.execute(insert(t.tenants).values(name=name, created_at=now))
    except IntegrityError:
        pass


KEY_ID = "key_"  # a key's public id is this + the first KEY_ID_HEX hex digits of its sha256
KEY_ID_HEX = 16

_ACTIVE_KEYS = (
    select(func.count()).where(t.api_keys.c.tenant == t.tenants.c.name, t.api_keys.c.revoked_at.is_(None))
    .correlate(t.tenants).scalar_subquery().label("active_keys")
)


def to_tenant(row: Row) -> Tenant:
    return Tenant(row.name, utc(row.created_at), utc(row.deleted_at), int(row.active_keys))  # type: ignore[arg-type]


def get_tenant(conn: Connection, name: str) -> Tenant | None:
    row = conn.execute(select(t.tenants, _ACTIVE_KEYS).where(t.tenants.c.name == name)).first()
    return None if row is None else to_tenant(row)


def list_tenants(conn: Connection) -> list[Tenant]:
    return [to_tenant(r) for r in conn.execute(select(t.tenants, _ACTIVE_KEYS).order_by(t.tenants.c.name))]


def tenant_quotas(conn: Connection, name: str) -> Quotas:
    c = t.tenants.c
    row = conn.execute(select(c.max_runs, c.max_queued, c.max_adapters).where(c.name == name)).first()
    return Quotas() if row is None else Quotas(row.max_runs, row.max_queued, row.max_adapters)


def set_tenant_quotas(conn: Connection, name: str, values: Mapping[str, int | None]) -> None:
    conn.execute(update(t.tenants).where(t.tenants.c.name == name).values(**values))


def count_policies(conn: Connection, owner: str) -> int:
    p = t.policies.c
    return conn.execute(select(func.count()).select_from(t.policies).where(
        p.owner == owner, p.deleted_at.is_(None))).scalar_one()


def mark_tenant_deleted(conn: Connection, name: str, now: datetime) -> None:
    tn = t.tenants.c
    conn.execute(update(t.tenants).where(tn.name == name, tn.deleted_at.is_(None)).values(deleted_at=now))


def insert_key(conn: Connection, key_hash: str, prefix: str, tenant: str, label: str | None,
               now: datetime) -> None:
    conn.execute(insert(t.api_keys).values(key_hash=key_hash, prefix=prefix, tenant=tenant, label=label,
                                           created_at=now))


# The tenant a key authenticates: live key of a live tenant, one primary-key lookup.
_TENANT_FOR_KEY = (
    select(t.api_keys.c.tenant)
    .select_from(t.api_keys.join(t.tenants, t.tenants.c.name == t.api_keys.c.tenant))
    .where(t.api_keys.c.key_hash == bindparam("key_hash"), t.api_keys.c.revoked_at.is_(None),
           t.tenants.c.deleted_at.is_(None))
)


def tenant_for_key(conn: Connection, key_hash: str) -> str | None:
    row = conn.execute(_TENANT_FOR_KEY, dict(key_hash=key_hash)).first()
    return None if row is None else row.tenant


def to_key(row: Row) -> ApiKey:
    return ApiKey(id=KEY_ID + row.key_hash[:KEY_ID_HEX], prefix=row.prefix, tenant=row.tenant,
                  label=row.label, created_at=utc(row.created_at),  # type: ignore[arg-type]
                  revoked_at=utc(row.revoked_at))


def list_keys(conn: Connection, tenant: str | None = None) -> list[ApiKey]:
    k = t.api_keys.c
    stmt = select(t.api_keys).order_by(k.created_at, k.key_hash)
    if tenant is not None:
        stmt = stmt.where(k.tenant == tenant)
    return [to_key(r) for r in conn.execute(stmt)]


def find_keys(conn: Connection, *, key_hash: str | None = None, hash_prefix: str | None = None,
              prefix: str | None = None) -> list[ApiKey]:
    """Keys with exactly this hash, or whose hash / shown prefix starts with the given text
    (exactly one of the three)."""
    k = t.api_keys.c
    if key_hash is not None:
        cond = k.key_hash == key_hash
    elif hash_prefix is not None:
        cond = k.key_hash.startswith(hash_prefix, autoescape=True)
    elif prefix is not None:
        cond = k.prefix.startswith(prefix, autoescape=True)
    else:
        raise TypeError("find_keys needs key_hash, hash_prefix or prefix")
    return [to_key(r) for r in conn.execute(select(t.api_keys).where(cond).order_by(k.created_at))]


def revoke_keys(conn: Connection, now: datetime, *, key_id: str | None = None, tenant: str | None = None) -> int:
    """Revoke the live key with this (complete) id, or every live key of `tenant`; returns how many."""
    k = t.api_keys.c
    if key_id is not None:
        digits = key_id.removeprefix(KEY_ID)
        if len(digits) != KEY_ID_HEX:
            raise ValueError(f"not a complete key id: {key_id!r}")
        cond = k.key_hash.startswith(digits, autoescape=True)
    else:
        cond = k.tenant == tenant
    return conn.execute(update(t.api_keys).where(cond, k.revoked_at.is_(None)).values(revoked_at=now)).rowcount


# ---- policies ---------------------------------------------------------------------------


def to_policy(row: Row, metadata: Mapping[str, str] | None = None) -> Policy:
    return Policy(
        id=PolicyId(row.id), owner=row.owner, name=row.name, base_model=row.base_model,
        base_digest=row.base_digest,
        lora=LoraConfig(row.lora_rank, row.lora_alpha, tuple(row.target_modules.split(",")),
                        row.use_rslora),
        parent_revision_id=row.parent_revision_id, public=row.public,
        created_at=utc(row.created_at), metadata=dict(metadata or {}),  # type: ignore[arg-type]
        tinker_run_id=row.tinker_run_id, deleted_at=utc(row.deleted_at),
    )


def policy_row(p: Policy) -> dict[str, object]:
    return dict(
        id=p.id, owner=p.owner, name=p.name, base_model=p.base_model, base_digest=p.base_digest,
        lora_rank=p.lora.rank, lora_alpha=p.lora.alpha,
        target_modules=",".join(p.lora.target_modules), use_rslora=p.lora.use_rslora,
        parent_revision_id=p.parent_revision_id, public=p.public, created_at=p.created_at,
        deleted_at=p.deleted_at, tinker_run_id=p.tinker_run_id,
    )


def insert_policy(conn: Connection, p: Policy) -> None:
    conn.execute(insert(t.policies).values(**policy_row(p)))
    if p.metadata:
        conn.execute(insert(t.policy_metadata),
                     [dict(policy_id=p.id, key=k, value=v) for k, v in p.metadata.items()])


def _metadata_of(conn: Connection, ids: Sequence[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {i: {} for i in ids}
    if ids:
        m = t.policy_metadata.c
        for r in conn.execute(select(m.policy_id, m.key, m.value).where(m.policy_id.in_(ids))):
            out[r.policy_id][r.key] = r.value
    return out


# The policy by name plus, in the same query, where one of its aliases points.
_POLICY_WITH_ALIAS = (
    select(t.policies, t.aliases.c.revision_id.label("alias_target"))
    .select_from(t.policies.outerjoin(
        t.aliases,
        and_(t.aliases.c.policy_id == t.policies.c.id, t.aliases.c.name == bindparam("alias")),
    ))
    .where(t.policies.c.owner == bindparam("owner"), t.policies.c.name == bindparam("name"))
)


def policy_with_alias(conn: Connection, owner: str, name: str, alias: str) -> tuple[Policy, str | None] | None:
    row = conn.execute(_POLICY_WITH_ALIAS, dict(owner=owner, name=name, alias=alias)).first()
    return None if row is None else (to_policy(row), row.alias_target)


def get_policy(conn: Connection, owner: str, name: str, with_metadata: bool = True) -> Policy | None:
    p = t.policies.c
    row = conn.execute(select(t.policies).where(p.owner == owner, p.name == name)).first()
    if row is None:
        return None
    return to_policy(row, _metadata_of(conn, [row.id])[row.id] if with_metadata else None)


def get_policy_by_id(conn: Connection, policy_id: str) -> Policy | None:
    row = conn.execute(select(t.policies).where(t.policies.c.id == policy_id)).first()
    return None if row is None else to_policy(row, _metadata_of(conn, [row.id])[row.id])


def get_policy_by_run(conn: Connection, run_id: str) -> Policy | None:
    row = conn.execute(select(t.policies).where(t.policies.c.tinker_run_id == run_id)).first()
    return None if row is None else to_policy(row, _metadata_of(conn, [row.id])[row.id])


def list_policies(
    conn: Connection, who: Principal, *, owner: str | None, base_model: str | None,
    metadata: Mapping[str, str], query: str | None, limit: int, after: str | None,
) -> list[Policy]:
    """Visible, live policies in id (= creation) order, starting after the cursor id."""
    p = t.policies.c
    stmt = select(t.policies).where(p.deleted_at.is_(None)).order_by(p.id).limit(limit)
    if not who.admin:
        stmt = stmt.where(or_(p.owner == who.tenant, p.public.is_(True)))
    if owner:
        stmt = stmt.where(p.owner == owner)
    if base_model:
        stmt = stmt.where(p.base_model == base_model)
    if query:
        stmt = stmt.where(p.name.contains(query, autoescape=True))
    if after:
        stmt = stmt.where(p.id > after)
    for key, value in metadata.items():
        m = t.policy_metadata.alias()
        stmt = stmt.where(select(m.c.policy_id).where(
            m.c.policy_id == p.id, m.c.key == key, m.c.value == value).exists())
    rows = conn.execute(stmt).all()
    meta = _metadata_of(conn, [r.id for r in rows])
    return [to_policy(r, meta[r.id]) for r in rows]


def soft_delete_policy(conn: Connection, policy_id: str, now: datetime) -> None:
    conn.execute(update(t.policies).where(t.policies.c.id == policy_id).values(deleted_at=now))


def rename_policy(conn: Connection, policy_id: str, owner: str, name: str) -> None:
    conn.execute(update(t.policies).where(t.policies.c.id == policy_id).values(owner=owner, name=name))


def set_public(conn: Connection, policy_id: str, public: bool) -> None:
    conn.execute(update(t.policies).where(t.policies.c.id == policy_id).values(public=public))


def lock_policy(conn: Connection, policy_id: str) -> None:
    """Serialize writers of one policy (revision numbering, alias moves). SQLite: already
    serialized by BEGIN IMMEDIATE, and FOR UPDATE is not emitted."""
    conn.execute(select(t.policies.c.id).where(t.policies.c.id == policy_id).with_for_update())


# ---- revisions --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Located:
    """A revision plus what decides who may see it."""

    revision: Revision
    owner: str
    public: bool
    policy_deleted: bool


_REV_SELECT = select(
    t.revisions, t.policies.c.owner, t.policies.c.name.label("policy_name"),
    t.policies.c.public, t.policies.c.deleted_at.label("policy_deleted_at"),
).select_from(t.revisions.join(t.policies, t.policies.c.id == t.revisions.c.policy_id))
_REV_BY_ID = _REV_SELECT.where(t.revisions.c.id == bindparam("id"))
_REV_BY_TINKER = _REV_SELECT.where(
    t.revisions.c.tinker_path == bindparam("path"), t.policies.c.tinker_run_id == bindparam("run")
)
_REV_LATEST = (
    _REV_SELECT.where(
        t.revisions.c.policy_id == bindparam("policy_id"),
        or_(t.revisions.c.expires_at.is_(None), t.revisions.c.expires_at > bindparam("now")),
    )
    .order_by(t.revisions.c.seq.desc())
    .limit(1)
)


def to_located(row: Row) -> Located:
    rev = Revision(
        id=RevisionId(row.id), policy_id=PolicyId(row.policy_id),
        policy=f"{row.owner}/{row.policy_name}", seq=row.seq, kind=RevisionKind(row.kind),
        sha256=row.sha256, size_bytes=row.size_bytes, store_url=row.store_url, step=row.step,
        provenance=Provenance(
            parent_revision_id=row.parent_revision_id, loss_fn=row.loss_fn,
            loss_config=row.loss_config, optimizer_config=row.optimizer_config,
            data_digest=row.data_digest, code_version=row.code_version,
        ),
        created_by=row.created_by, created_at=utc(row.created_at),  # type: ignore[arg-type]
        expires_at=utc(row.expires_at), tinker_path=row.tinker_path,
    )
    return Located(rev, row.owner, row.public, row.policy_deleted_at is not None)


def revision_row(r: Revision) -> dict[str, object]:
    pv = r.provenance
    return dict(
        id=r.id, policy_id=r.policy_id, seq=r.seq, kind=str(r.kind), sha256=r.sha256,
        size_bytes=r.size_bytes, store_url=r.store_url, step=r.step,
        parent_revision_id=pv.parent_revision_id, loss_fn=pv.loss_fn, loss_config=pv.loss_config,
        optimizer_config=pv.optimizer_config, data_digest=pv.data_digest,
        code_version=pv.code_version, created_by=r.created_by, created_at=r.created_at,
        expires_at=r.expires_at, tinker_path=r.tinker_path,
    )


def file_rows(revision_id: str, manifest: Manifest) -> list[dict[str, object]]:
    return [dict(revision_id=revision_id, filename=n, sha256=b.sha256, size_bytes=b.size_bytes)
            for n, b in manifest.files]


def next_seq(conn: Connection, policy_id: str) -> int:
    r = t.revisions.c
    return int(conn.execute(select(func.coalesce(func.max(r.seq), 0)).where(r.policy_id == policy_id)).scalar_one()) + 1


def insert_revision(conn: Connection, rev: Revision, manifest: Manifest) -> None:
    conn.execute(insert(t.revisions).values(**revision_row(rev)))
    conn.execute(insert(t.revision_files), file_rows(rev.id, manifest))


def bulk_insert(conn: Connection, table: str, rows: list[dict[str, object]]) -> None:
    """Bulk load (benchmarks, imports): COPY on PostgreSQL, executemany elsewhere."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        _copy(conn, table, rows)
    else:
        conn.execute(insert(t.metadata.tables[table]), rows)


def _copy(conn: Connection, table: str, rows: list[dict[str, object]]) -> None:
    cols = list(rows[0])
    json_cols = {c.name for c in t.metadata.tables[table].columns if isinstance(c.type, JSON)}
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    with cursor.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row([json.dumps(row[c]) if c in json_cols and row[c] is not None else row[c]
                            for c in cols])


def revision_by_id(conn: Connection, revision_id: str) -> Located | None:
    row = conn.execute(_REV_BY_ID, dict(id=revision_id)).first()
    return None if row is None else to_located(row)


def revision_by_tinker_path(conn: Connection, path: str, run_id: str) -> Located | None:
    """The revision holding `path`, if it belongs to the policy of training run `run_id`."""
    row = conn.execute(_REV_BY_TINKER, dict(path=path, run=run_id)).first()
    return None if row is None else to_located(row)


def latest_revision(conn: Connection, policy_id: str, now: datetime) -> Located | None:
    row = conn.execute(_REV_LATEST, dict(policy_id=policy_id, now=now)).first()
    return None if row is None else to_located(row)


def revisions_by_prefix(conn: Connection, policy_id: str | None, column: str, prefix: str, limit: int) -> list[Located]:
    """Revisions whose id or sha256 starts with `prefix` (an indexed range scan)."""
    col = t.revisions.c[column]
    stmt = _REV_SELECT.where(col >= prefix, col < prefix + "\U0010ffff").order_by(t.revisions.c.seq.desc()).limit(limit)
    if policy_id is not None:
        stmt = stmt.where(t.revisions.c.policy_id == policy_id)
    return [to_located(r) for r in conn.execute(stmt)]


def list_revisions(conn: Connection, policy_id: str, limit: int, before_seq: int | None) -> list[Located]:
    """Newest first; `before_seq` is the pagination cursor."""
    stmt = _REV_SELECT.where(t.revisions.c.policy_id == policy_id).order_by(t.revisions.c.seq.desc()).limit(limit)
    if before_seq is not None:
        stmt = stmt.where(t.revisions.c.seq < before_seq)
    return [to_located(r) for r in conn.execute(stmt)]


def children_of(conn: Connection, revision_ids: Iterable[str]) -> list[Located]:
    ids = list(revision_ids)
    if not ids:
        return []
    stmt = _REV_SELECT.where(t.revisions.c.parent_revision_id.in_(ids)).order_by(t.revisions.c.id)
    return [to_located(r) for r in conn.execute(stmt)]


def load_manifest(conn: Connection, revision_id: str) -> Manifest:
    f = t.revision_files.c
    rows = conn.execute(select(f.filename, f.sha256, f.size_bytes).where(f.revision_id == revision_id))
    return Manifest.of({r.filename: BlobRef(r.sha256, r.size_bytes) for r in rows})


def delete_revision(conn: Connection, revision_id: str) -> None:
    conn.execute(delete(t.revisions).where(t.revisions.c.id == revision_id))


def expired_revisions(conn: Connection, now: datetime) -> list[tuple[str, bool]]:
    """(id, still aliased) of every revision whose expiry has passed."""
    r, a = t.revisions.c, t.aliases.c
    aliased = select(a.revision_id).where(a.revision_id == r.id).exists()
    stmt = select(r.id, aliased.label("aliased")).where(r.expires_at.is_not(None), r.expires_at <= now)
    return [(row.id, bool(row.aliased)) for row in conn.execute(stmt)]


def referenced_blobs(conn: Connection) -> set[str]:
    """Blobs a revision or a Tinker checkpoint (catalog/tinker_tables.py) names: gc keeps these."""
    from lorafleet.catalog.tinker_tables import tinker_checkpoint_files

    revs = select(t.revision_files.c.sha256)
    return set(conn.execute(revs.union(select(tinker_checkpoint_files.c.sha256))).scalars())


def all_files(conn: Connection) -> Iterable[tuple[str, str, str, int]]:
    """(revision id, filename, sha256, size) of every stored file of every revision."""
    f = t.revision_files.c
    for row in conn.execute(select(f.revision_id, f.filename, f.sha256, f.size_bytes)):
        yield row.revision_id, row.filename, row.sha256, row.size_bytes


def revisions_without_files(conn: Connection) -> list[str]:
    r, f = t.revisions.c, t.revision_files.c
    has = select(f.revision_id).where(f.revision_id == r.id).exists()
    return list(conn.execute(select(r.id).where(~has)).scalars())


def count_revisions(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(t.revisions)).scalar_one())


# ---- aliases ----------------------------------------------------------------------------


def get_alias(conn: Connection, policy: Policy, name: str) -> Alias | None:
    a = t.aliases.c
    row = conn.execute(select(t.aliases).where(a.policy_id == policy.id, a.name == name)).first()
    return None if row is None else Alias(policy.full_name, row.name, row.revision_id, row.version, utc(row.updated_at))  # type: ignore[arg-type]


def list_aliases(conn: Connection, policy: Policy) -> list[Alias]:
    a = t.aliases.c
    rows = conn.execute(select(t.aliases).where(a.policy_id == policy.id).order_by(a.name))
    return [Alias(policy.full_name, r.name, r.revision_id, r.version, utc(r.updated_at)) for r in rows]  # type: ignore[arg-type]


def aliases_pointing_at(conn: Connection, revision_id: str) -> list[str]:
    a = t.aliases.c
    return list(conn.execute(select(a.name).where(a.revision_id == revision_id).order_by(a.name)).scalars())


def move_alias(
    conn: Connection, policy: Policy, name: str, to: str, *, action: str, actor: str,
    reason: str | None, now: datetime,
) -> AliasEvent:
    """Point `name` at `to` and append the event; caller holds the policy lock.

    The version check makes a lost update impossible even without the lock: the UPDATE only
    matches the version we read, and the event's (policy, alias, seq) is unique.
    """
    current = get_alias(conn, policy, name)
    seq = 1 if current is None else current.version + 1
    if current is None:
        conn.execute(insert(t.aliases).values(policy_id=policy.id, name=name, revision_id=to, version=1, updated_at=now))
    else:
        a = t.aliases.c
        res = conn.execute(update(t.aliases).where(
            a.policy_id == policy.id, a.name == name, a.version == current.version,
        ).values(revision_id=to, version=seq, updated_at=now))
        if res.rowcount != 1:
            raise RuntimeError(f"alias {policy.full_name}:{name} moved concurrently")  # lock bug
    event = AliasEvent(policy.full_name, name, seq, action,
                       None if current is None else current.revision_id,  # type: ignore[arg-type]
                       to, actor, reason, now)  # type: ignore[arg-type]
    conn.execute(insert(t.alias_events).values(
        policy_id=policy.id, alias=name, seq=seq, action=action,
        from_revision_id=event.from_revision_id, to_revision_id=to, actor=actor, reason=reason, at=now,
    ))
    return event


def alias_history(conn: Connection, policy: Policy, name: str) -> list[AliasEvent]:
    e = t.alias_events.c
    rows = conn.execute(select(t.alias_events).where(e.policy_id == policy.id, e.alias == name).order_by(e.seq))
    return [AliasEvent(policy.full_name, r.alias, r.seq, r.action, r.from_revision_id, r.to_revision_id,
                       r.actor, r.reason, utc(r.at)) for r in rows]  # type: ignore[arg-type]


# ---- evaluations ------------------------------------------------------------------------


def insert_evaluation(
    conn: Connection, revision_id: str, suite: str, metrics: Mapping[str, float],
    details: Mapping[str, object], actor: str, now: datetime,
) -> Evaluation:
    res = conn.execute(insert(t.evaluations).values(
        revision_id=revision_id, suite=suite, metrics=dict(metrics), details=dict(details),
        created_by=actor, created_at=now,
    ))
    eid = int(res.inserted_primary_key[0])  # type: ignore[index]
    return Evaluation(eid, RevisionId(revision_id), suite, dict(metrics), dict(details), actor, now)


def list_evaluations(conn: Connection, revision_id: str) -> list[Evaluation]:
    e = t.evaluations.c
    rows = conn.execute(select(t.evaluations).where(e.revision_id == revision_id).order_by(e.id))
    return [Evaluation(r.id, r.revision_id, r.suite, dict(r.metrics), dict(r.details), r.created_by,
                       utc(r.created_at)) for r in rows]  # type: ignore[arg-type]


# ---- audit log --------------------------------------------------------------------------


def audit(conn: Connection, now: datetime, actor: str, tenant: str, action: str, target: str, *,
          from_value: str | None = None, to_value: str | None = None, reason: str | None = None) -> None:
    """Append one audit event, in the caller's transaction (so it commits with the change)."""
    conn.execute(insert(t.audit_events).values(at=now, actor=actor, tenant=tenant, action=str(action),
                                               target=target, from_value=from_value,
                                               to_value=to_value, reason=reason))


def list_audit(conn: Connection, tenant: str | None, limit: int, before_id: int | None) -> list[AuditEvent]:
    """Newest first; `tenant` None: every tenant's events."""
    e = t.audit_events.c
    q = select(t.audit_events).order_by(e.id.desc()).limit(limit)
    if tenant is not None:
        q = q.where(e.tenant == tenant)
    if before_id is not None:
        q = q.where(e.id < before_id)
    return [AuditEvent(r.id, utc(r.at), r.actor, r.tenant, r.action, r.target, r.from_value,  # type: ignore[arg-type]
                       r.to_value, r.reason) for r in conn.execute(q)]
