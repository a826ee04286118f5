"""SQLAlchemy tables of the catalog. Constraints here encode the invariants:

- `owner/name` is unique; an alias is unique per policy; a revision's `seq` is unique per
  policy; a `tinker_path` and a `tinker_run_id` name at most one thing;
- an alias can only point at an existing revision (foreign key, no cascade), so a revision an
  alias points at cannot be deleted;
- revisions and their files are never updated, and alias history is append-only: the
  migrations add triggers that abort any such UPDATE/DELETE (see migrations/versions/0001);
- alias history and the audit log are append-only (triggers, migrations 0001 and 0003);
- tenants and keys are never deleted, only marked (`deleted_at`, `revoked_at`), so a name or
  key once issued can never come back to life by being created again.

The schema is created by the Alembic migrations, never by `metadata.create_all`; a test checks
that the migrated schema matches these definitions.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

ID = String(32)  # "pol_" / "rev_" + 26 ULID chars
NAME = String(64)
SHA = String(64)
TS = DateTime(timezone=True)

tenants = Table(
    "tenants", metadata,
    Column("name", NAME, primary_key=True),
    Column("created_at", TS, nullable=False),
    Column("deleted_at", TS),  # set once: the tenant can no longer authenticate
    # quotas (NULL: the server's default; see api/quotas.py)
    Column("max_runs", Integer),
    Column("max_queued", Integer),
    Column("max_adapters", Integer),
)

api_keys = Table(
    "api_keys", metadata,
    Column("key_hash", SHA, primary_key=True),  # sha256 of the plaintext key; the key id derives from it
    Column("tenant", NAME, ForeignKey("tenants.name"), nullable=False),
    Column("label", String(200)),
    Column("created_at", TS, nullable=False),
    Column("revoked_at", TS),
    Column("prefix", String(16)),  # the key's first characters, to recognise it (None: keys before 0002)
)
Index("ix_api_keys_tenant", api_keys.c.tenant)

policies = Table(
    "policies", metadata,
    Column("id", ID, primary_key=True),
    Column("owner", NAME, ForeignKey("tenants.name"), nullable=False),
    Column("name", NAME, nullable=False),
    Column("base_model", String(200), nullable=False),
    Column("base_digest", SHA),
    Column("lora_rank", Integer, nullable=False),
    Column("lora_alpha", Float, nullable=False),
    Column("target_modules", String(200), nullable=False),  # comma-joined, canonical order
    Column("use_rslora", Boolean, nullable=False),
    Column("parent_revision_id", ID),  # branched from; plain id so lineage survives deletes
    Column("public", Boolean, nullable=False),
    Column("created_at", TS, nullable=False),
    Column("deleted_at", TS),
    Column("tinker_run_id", String(200), unique=True),
    UniqueConstraint("owner", "name", name="uq_policies_owner_name"),
    CheckConstraint("lora_rank >= 1", name="ck_policies_rank"),
)
Index("ix_policies_base_model", policies.c.base_model)

policy_metadata = Table(
    "policy_metadata", metadata,
    Column("policy_id", ID, ForeignKey("policies.id"), primary_key=True),
    Column("key", String(128), primary_key=True),
    Column("value", String(1024), nullable=False),
)
Index("ix_policy_metadata_key_value", policy_metadata.c.key, policy_metadata.c.value)

revisions = Table(
    "revisions", metadata,
    Column("id", ID, primary_key=True),
    Column("policy_id", ID, ForeignKey("policies.id"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("sha256", SHA, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("store_url", String(1024), nullable=False),
    Column("step", Integer),
    Column("parent_revision_id", ID),
    Column("loss_fn", String(64)),
    Column("loss_config", JSON),
    Column("optimizer_config", JSON),
    Column("data_digest", SHA),
    Column("code_version", String(128)),
    Column("created_by", NAME, nullable=False),
    Column("created_at", TS, nullable=False),
    Column("expires_at", TS),
    Column("tinker_path", String(512), unique=True),
    UniqueConstraint("policy_id", "seq", name="uq_revisions_policy_seq"),
    CheckConstraint("kind IN ('sampler', 'state')", name="ck_revisions_kind"),
    CheckConstraint("seq >= 1 AND size_bytes >= 0", name="ck_revisions_seq_size"),
)
Index("ix_revisions_policy_sha", revisions.c.policy_id, revisions.c.sha256)
Index("ix_revisions_parent", revisions.c.parent_revision_id)
Index("ix_revisions_expires", revisions.c.expires_at)

revision_files = Table(
    "revision_files", metadata,
    Column("revision_id", ID, ForeignKey("revisions.id", ondelete="CASCADE"), primary_key=True),
    Column("filename", String(128), primary_key=True),
    Column("sha256", SHA, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
)
Index("ix_revision_files_sha", revision_files.c.sha256)

aliases = Table(
    "aliases", metadata,
    Column("policy_id", ID, ForeignKey("policies.id"), primary_key=True),
    Column("name", NAME, primary_key=True),
    Column("revision_id", ID, ForeignKey("revisions.id"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("updated_at", TS, nullable=False),
)
Index("ix_aliases_revision", aliases.c.revision_id)

alias_events = Table(
    "alias_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("policy_id", ID, ForeignKey("policies.id"), nullable=False),
    Column("alias", NAME, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("action", String(16), nullable=False),
    Column("from_revision_id", ID),
    Column("to_revision_id", ID, nullable=False),
    Column("actor", NAME, nullable=False),
    Column("reason", Text),
    Column("at", TS, nullable=False),
    UniqueConstraint("policy_id", "alias", "seq", name="uq_alias_events_seq"),
)

evaluations = Table(
    "evaluations", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("revision_id", ID, ForeignKey("revisions.id", ondelete="CASCADE"), nullable=False),
    Column("suite", String(128), nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("details", JSON, nullable=False),
    Column("created_by", NAME, nullable=False),
    Column("created_at", TS, nullable=False),
)
Index("ix_evaluations_revision", evaluations.c.revision_id)

audit_events = Table(
    "audit_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", TS, nullable=False),
    Column("actor", NAME, nullable=False),  # the tenant (or admin) who did it
    Column("tenant", NAME, nullable=False),  # whose object it was: who may read the event
    Column("action", String(32), nullable=False),  # see records.AuditEvent
    Column("target", String(512), nullable=False),
    Column("from_value", String(512)),
    Column("to_value", String(512)),
    Column("reason", Text),
)
Index("ix_audit_events_tenant", audit_events.c.tenant, audit_events.c.id)

# The Tinker service's tables share this metadata (and the migrations): registered on import.
from lorafleet.catalog import tinker_tables as _tinker_tables  # noqa: E402,F401
