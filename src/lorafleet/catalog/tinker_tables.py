"""SQLAlchemy tables of the Tinker service's state, in the catalog's database (migration 0004).

Sessions, training runs, samplers, checkpoints, futures and per-step run metrics. Every row
carries its `tenant`; the one repository over these tables is `api/tinker/repo.py`, and it is
the only place that reads or writes them (besides the catalog's gc and fsck, which read
`tinker_checkpoint_files` so a checkpoint's blobs are never collected).

A checkpoint's bytes live in the catalog's blob store (one copy): `tinker_checkpoint_files`
names its blobs, and a training or sampler checkpoint is also a catalog revision
(`revision_id`) committed in the same transaction as its row. Times are unix seconds (floats),
as the Tinker wire protocol reports them. Futures are the durable results several API servers
share: `owner` is the server instance computing one (api/tinker/instance.py).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from lorafleet.catalog.tables import ID, NAME, SHA, metadata

RUN = String(200)  # a run or sampler id: `<session>:train:<n>` (catalog/refs.py RUN_ID_RE)
PATH = String(512)  # a tinker:// path (run id <= 128, name <= 128)
T = Float  # unix seconds

tinker_sessions = Table(
    "tinker_sessions", metadata,
    Column("session_id", String(64), primary_key=True),
    Column("tenant", NAME, nullable=False),
    Column("created", T, nullable=False),
    Column("last_heartbeat", T, nullable=False),
    Column("finished", Text),  # the reason (success, expired, ...); NULL while open
    Column("user_metadata", JSON),
    Column("display_name", Text),
    Column("tags", JSON),
    Column("sdk_version", Text),
    Column("project_id", Text),  # a label (SDK 0.38 projects); NULL: the default project
)
Index("ix_tinker_sessions_tenant", tinker_sessions.c.tenant, tinker_sessions.c.created)
Index("ix_tinker_sessions_open", tinker_sessions.c.finished, tinker_sessions.c.last_heartbeat)

tinker_runs = Table(
    "tinker_runs", metadata,
    Column("model_id", RUN, primary_key=True),
    Column("tenant", NAME, nullable=False),
    Column("session_id", String(64), nullable=False),
    Column("base_model", Text, nullable=False),
    Column("lora", JSON, nullable=False),
    Column("user_metadata", JSON),
    Column("created", T, nullable=False),
    Column("last_request", T, nullable=False),
    Column("step", Integer, nullable=False),
    Column("corrupted", Boolean, nullable=False),
)
Index("ix_tinker_runs_tenant", tinker_runs.c.tenant, tinker_runs.c.created)
Index("ix_tinker_runs_session", tinker_runs.c.session_id)

tinker_samplers = Table(
    "tinker_samplers", metadata,
    Column("sampler_id", RUN, primary_key=True),
    Column("tenant", NAME, nullable=False),
    Column("session_id", String(64), nullable=False),
    Column("base_model", Text, nullable=False),
    Column("model_path", Text),
    Column("source_model_id", RUN),
    Column("created", T, nullable=False),
)
Index("ix_tinker_samplers_session", tinker_samplers.c.session_id)

tinker_checkpoints = Table(
    "tinker_checkpoints", metadata,
    Column("tinker_path", PATH, primary_key=True),
    Column("tenant", NAME, nullable=False),
    Column("model_id", RUN, nullable=False),
    Column("kind", String(16), nullable=False),  # training | sampler | external
    Column("name", String(128), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("public", Boolean, nullable=False),
    Column("expires_at", T),
    Column("created", T, nullable=False),
    Column("user_metadata", JSON),
    Column("meta", JSON),  # provenance: base, digest, step, loss, optimizer, LoRA flags
    Column("revision_id", ID),  # the catalog revision of a training/sampler checkpoint
)
Index("ix_tinker_checkpoints_tenant", tinker_checkpoints.c.tenant, tinker_checkpoints.c.created)
Index("ix_tinker_checkpoints_run", tinker_checkpoints.c.model_id, tinker_checkpoints.c.created)
Index("ix_tinker_checkpoints_expires", tinker_checkpoints.c.expires_at)

tinker_checkpoint_files = Table(
    "tinker_checkpoint_files", metadata,
    Column("tinker_path", PATH, ForeignKey("tinker_checkpoints.tinker_path", ondelete="CASCADE"),
           primary_key=True),
    Column("filename", String(128), primary_key=True),
    Column("sha256", SHA, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
)
Index("ix_tinker_checkpoint_files_sha", tinker_checkpoint_files.c.sha256)

tinker_futures = Table(
    "tinker_futures", metadata,
    Column("request_id", String(64), primary_key=True),
    Column("tenant", NAME, nullable=False),
    Column("kind", String(64), nullable=False),
    Column("scope", String(512)),  # with seq_id: the ordering key (run id, session models, ...)
    Column("seq_id", BigInteger),
    Column("idem_key", SHA),  # sha256 of the client's X-Idempotency-Key
    Column("fingerprint", Text, nullable=False),
    Column("state", String(16), nullable=False),  # pending | done | failed | expired
    Column("owner", String(64)),  # the server instance computing it (NULL: from before 0004)
    Column("content_type", String(64)),
    Column("payload", LargeBinary),
    Column("error", Text),
    Column("category", String(16)),
    Column("created", T, nullable=False),
    Column("completed", T),
    Column("delivered", T),
    UniqueConstraint("scope", "seq_id", name="uq_tinker_futures_scope_seq"),
    UniqueConstraint("tenant", "idem_key", name="uq_tinker_futures_idem"),
)
Index("ix_tinker_futures_state", tinker_futures.c.state, tinker_futures.c.owner)
Index("ix_tinker_futures_tenant_state", tinker_futures.c.tenant, tinker_futures.c.state)

tinker_run_metrics = Table(
    "tinker_run_metrics", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_id", RUN, nullable=False),
    Column("step", Integer, nullable=False),
    Column("kind", String(16), nullable=False),  # train | eval
    Column("name", String(128), nullable=False),
    Column("value", Float, nullable=False),
    Column("at", T, nullable=False),
)
Index("ix_tinker_run_metrics_run", tinker_run_metrics.c.model_id, tinker_run_metrics.c.id)

tinker_settings = Table(
    "tinker_settings", metadata,
    Column("name", String(64), primary_key=True),
    Column("value", LargeBinary, nullable=False),  # e.g. the download-URL signing secret
)
