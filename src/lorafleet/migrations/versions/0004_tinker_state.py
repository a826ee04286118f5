"""The Tinker service's state in the catalog database: sessions, runs, samplers, checkpoints
(and the blobs they name), futures, run metrics, settings.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Until now this state lived in a private SQLite file per server (`<state dir>/tinker.db`) and
checkpoint folders beside it. Here it joins the catalog's database, so several API servers
over one PostgreSQL share it, and checkpoint bytes live once, in the catalog's blob store. A
home that still has a `tinker.db` is refused at start with what to do (docs/operations.md).
Plain CREATE TABLE on both SQLite and PostgreSQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_TABLES = ("tinker_checkpoint_files", "tinker_settings", "tinker_sessions", "tinker_samplers",
           "tinker_runs", "tinker_run_metrics", "tinker_futures", "tinker_checkpoints")


def upgrade() -> None:
    op.create_table('tinker_checkpoints',
    sa.Column('tinker_path', sa.String(length=512), nullable=False),
    sa.Column('tenant', sa.String(length=64), nullable=False),
    sa.Column('model_id', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('public', sa.Boolean(), nullable=False),
    sa.Column('expires_at', sa.Float(), nullable=True),
    sa.Column('created', sa.Float(), nullable=False),
    sa.Column('user_metadata', sa.JSON(), nullable=True),
    sa.Column('meta', sa.JSON(), nullable=True),
    sa.Column('revision_id', sa.String(length=32), nullable=True),
    sa.PrimaryKeyConstraint('tinker_path')
    )
    op.create_index('ix_tinker_checkpoints_expires', 'tinker_checkpoints', ['expires_at'], unique=False)
    op.create_index('ix_tinker_checkpoints_run', 'tinker_checkpoints', ['model_id', 'created'], unique=False)
    op.create_index('ix_tinker_checkpoints_tenant', 'tinker_checkpoints', ['tenant', 'created'], unique=False)
    op.create_table('tinker_futures',
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('tenant', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('scope', sa.String(length=512), nullable=True),
    sa.Column('seq_id', sa.BigInteger(), nullable=True),
    sa.Column('idem_key', sa.String(length=64), nullable=True),
    sa.Column('fingerprint', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('owner', sa.String(length=64), nullable=True),
    sa.Column('content_type', sa.String(length=64), nullable=True),
    sa.Column('payload', sa.LargeBinary(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('category', sa.String(length=16), nullable=True),
    sa.Column('created', sa.Float(), nullable=False),
    sa.Column('completed', sa.Float(), nullable=True),
    sa.Column('delivered', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('request_id'),
    sa.UniqueConstraint('scope', 'seq_id', name='uq_tinker_futures_scope_seq'),
    sa.UniqueConstraint('tenant', 'idem_key', name='uq_tinker_futures_idem')
    )
    op.create_index('ix_tinker_futures_state', 'tinker_futures', ['state', 'owner'], unique=False)
    op.create_index('ix_tinker_futures_tenant_state', 'tinker_futures', ['tenant', 'state'], unique=False)
    op.create_table('tinker_run_metrics',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('model_id', sa.String(length=200), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_tinker_run_metrics_run', 'tinker_run_metrics', ['model_id', 'id'], unique=False)
    op.create_table('tinker_runs',
    sa.Column('model_id', sa.String(length=200), nullable=False),
    sa.Column('tenant', sa.String(length=64), nullable=False),
    sa.Column('session_id', sa.String(length=64), nullable=False),
    sa.Column('base_model', sa.Text(), nullable=False),
    sa.Column('lora', sa.JSON(), nullable=False),
    sa.Column('user_metadata', sa.JSON(), nullable=True),
    sa.Column('created', sa.Float(), nullable=False),
    sa.Column('last_request', sa.Float(), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('corrupted', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('model_id')
    )
    op.create_index('ix_tinker_runs_session', 'tinker_runs', ['session_id'], unique=False)
    op.create_index('ix_tinker_runs_tenant', 'tinker_runs', ['tenant', 'created'], unique=False)
    op.create_table('tinker_samplers',
    sa.Column('sampler_id', sa.String(length=200), nullable=False),
    sa.Column('tenant', sa.String(length=64), nullable=False),
    sa.Column('session_id', sa.String(length=64), nullable=False),
    sa.Column('base_model', sa.Text(), nullable=False),
    sa.Column('model_path', sa.Text(), nullable=True),
    sa.Column('source_model_id', sa.String(length=200), nullable=True),
    sa.Column('created', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('sampler_id')
    )
    op.create_index('ix_tinker_samplers_session', 'tinker_samplers', ['session_id'], unique=False)
    op.create_table('tinker_sessions',
    sa.Column('session_id', sa.String(length=64), nullable=False),
    sa.Column('tenant', sa.String(length=64), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.Column('last_heartbeat', sa.Float(), nullable=False),
    sa.Column('finished', sa.Text(), nullable=True),
    sa.Column('user_metadata', sa.JSON(), nullable=True),
    sa.Column('display_name', sa.Text(), nullable=True),
    sa.Column('tags', sa.JSON(), nullable=True),
    sa.Column('sdk_version', sa.Text(), nullable=True),
    sa.Column('project_id', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('session_id')
    )
    op.create_index('ix_tinker_sessions_open', 'tinker_sessions', ['finished', 'last_heartbeat'], unique=False)
    op.create_index('ix_tinker_sessions_tenant', 'tinker_sessions', ['tenant', 'created'], unique=False)
    op.create_table('tinker_settings',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('value', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('tinker_checkpoint_files',
    sa.Column('tinker_path', sa.String(length=512), nullable=False),
    sa.Column('filename', sa.String(length=128), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['tinker_path'], ['tinker_checkpoints.tinker_path'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('tinker_path', 'filename')
    )
    op.create_index('ix_tinker_checkpoint_files_sha', 'tinker_checkpoint_files', ['sha256'], unique=False)


def downgrade() -> None:
    for table in _TABLES:  # indexes go with their tables
        op.drop_table(table)
