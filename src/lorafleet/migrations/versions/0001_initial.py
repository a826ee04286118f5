"""Initial catalog schema: tenants, keys, policies, revisions, aliases, evaluations.

Revision ID: 0001
Revises:
Create Date: 2026-11-29

Besides the tables, installs triggers that make the history tamper-proof at the database level:
`revisions` and `revision_files` rows can never be UPDATEd, and `alias_events` rows can never be
UPDATEd or DELETEd. (Revisions may still be DELETEd: gc of expired ones, explicit deletes; the
foreign key from `aliases` stops that for any revision an alias points at.)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# (table, operation) pairs refused by trigger.
_FROZEN = (("revisions", "UPDATE"), ("revision_files", "UPDATE"),
           ("alias_events", "UPDATE"), ("alias_events", "DELETE"))


def upgrade() -> None:
    op.create_table('tenants',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('api_keys',
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('tenant', sa.String(length=64), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant'], ['tenants.name'], ),
    sa.PrimaryKeyConstraint('key_hash')
    )
    op.create_table('policies',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('owner', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('base_model', sa.String(length=200), nullable=False),
    sa.Column('base_digest', sa.String(length=64), nullable=True),
    sa.Column('lora_rank', sa.Integer(), nullable=False),
    sa.Column('lora_alpha', sa.Float(), nullable=False),
    sa.Column('target_modules', sa.String(length=200), nullable=False),
    sa.Column('use_rslora', sa.Boolean(), nullable=False),
    sa.Column('parent_revision_id', sa.String(length=32), nullable=True),
    sa.Column('public', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('tinker_run_id', sa.String(length=200), nullable=True),
    sa.CheckConstraint('lora_rank >= 1', name='ck_policies_rank'),
    sa.ForeignKeyConstraint(['owner'], ['tenants.name'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('owner', 'name', name='uq_policies_owner_name'),
    sa.UniqueConstraint('tinker_run_id')
    )
    op.create_index('ix_policies_base_model', 'policies', ['base_model'], unique=False)
    op.create_table('alias_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('policy_id', sa.String(length=32), nullable=False),
    sa.Column('alias', sa.String(length=64), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('from_revision_id', sa.String(length=32), nullable=True),
    sa.Column('to_revision_id', sa.String(length=32), nullable=False),
    sa.Column('actor', sa.String(length=64), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['policy_id'], ['policies.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('policy_id', 'alias', 'seq', name='uq_alias_events_seq')
    )
    op.create_table('policy_metadata',
    sa.Column('policy_id', sa.String(length=32), nullable=False),
    sa.Column('key', sa.String(length=128), nullable=False),
    sa.Column('value', sa.String(length=1024), nullable=False),
    sa.ForeignKeyConstraint(['policy_id'], ['policies.id'], ),
    sa.PrimaryKeyConstraint('policy_id', 'key')
    )
    op.create_index('ix_policy_metadata_key_value', 'policy_metadata', ['key', 'value'], unique=False)
    op.create_table('revisions',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('policy_id', sa.String(length=32), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('store_url', sa.String(length=1024), nullable=False),
    sa.Column('step', sa.Integer(), nullable=True),
    sa.Column('parent_revision_id', sa.String(length=32), nullable=True),
    sa.Column('loss_fn', sa.String(length=64), nullable=True),
    sa.Column('loss_config', sa.JSON(), nullable=True),
    sa.Column('optimizer_config', sa.JSON(), nullable=True),
    sa.Column('data_digest', sa.String(length=64), nullable=True),
    sa.Column('code_version', sa.String(length=128), nullable=True),
    sa.Column('created_by', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('tinker_path', sa.String(length=512), nullable=True),
    sa.CheckConstraint("kind IN ('sampler', 'state')", name='ck_revisions_kind'),
    sa.CheckConstraint('seq >= 1 AND size_bytes >= 0', name='ck_revisions_seq_size'),
    sa.ForeignKeyConstraint(['policy_id'], ['policies.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('policy_id', 'seq', name='uq_revisions_policy_seq'),
    sa.UniqueConstraint('tinker_path')
    )
    op.create_index('ix_revisions_expires', 'revisions', ['expires_at'], unique=False)
    op.create_index('ix_revisions_parent', 'revisions', ['parent_revision_id'], unique=False)
    op.create_index('ix_revisions_policy_sha', 'revisions', ['policy_id', 'sha256'], unique=False)
    op.create_table('aliases',
    sa.Column('policy_id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('revision_id', sa.String(length=32), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['policy_id'], ['policies.id'], ),
    sa.ForeignKeyConstraint(['revision_id'], ['revisions.id'], ),
    sa.PrimaryKeyConstraint('policy_id', 'name')
    )
    op.create_index('ix_aliases_revision', 'aliases', ['revision_id'], unique=False)
    op.create_table('evaluations',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('revision_id', sa.String(length=32), nullable=False),
    sa.Column('suite', sa.String(length=128), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.Column('created_by', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['revision_id'], ['revisions.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_evaluations_revision', 'evaluations', ['revision_id'], unique=False)
    op.create_table('revision_files',
    sa.Column('revision_id', sa.String(length=32), nullable=False),
    sa.Column('filename', sa.String(length=128), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['revision_id'], ['revisions.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('revision_id', 'filename')
    )
    op.create_index('ix_revision_files_sha', 'revision_files', ['sha256'], unique=False)

    _install_triggers()


def _install_triggers() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(
            "CREATE FUNCTION lorafleet_immutable() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'lorafleet: % on % is forbidden (rows are immutable)', "
            "TG_OP, TG_TABLE_NAME; END $$"
        )
    for table, operation in _FROZEN:
        name = f"{table}_no_{operation.lower()}"
        if dialect == "postgresql":
            op.execute(f"CREATE TRIGGER {name} BEFORE {operation} ON {table} "
                       "FOR EACH ROW EXECUTE FUNCTION lorafleet_immutable()")
        elif dialect == "sqlite":
            op.execute(f"CREATE TRIGGER {name} BEFORE {operation} ON {table} BEGIN "
                       f"SELECT RAISE(ABORT, 'lorafleet: {operation} on {table} is forbidden "
                       "(rows are immutable)'); END")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table, operation in _FROZEN:
        name = f"{table}_no_{operation.lower()}"
        if dialect == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        elif dialect == "sqlite":
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    if dialect == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS lorafleet_immutable()")
    op.drop_index('ix_revision_files_sha', table_name='revision_files')
    op.drop_table('revision_files')
    op.drop_index('ix_evaluations_revision', table_name='evaluations')
    op.drop_table('evaluations')
    op.drop_index('ix_aliases_revision', table_name='aliases')
    op.drop_table('aliases')
    op.drop_index('ix_revisions_policy_sha', table_name='revisions')
    op.drop_index('ix_revisions_parent', table_name='revisions')
    op.drop_index('ix_revisions_expires', table_name='revisions')
    op.drop_table('revisions')
    op.drop_index('ix_policy_metadata_key_value', table_name='policy_metadata')
    op.drop_table('policy_metadata')
    op.drop_table('alias_events')
    op.drop_index('ix_policies_base_model', table_name='policies')
    op.drop_table('policies')
    op.drop_table('api_keys')
    op.drop_table('tenants')
