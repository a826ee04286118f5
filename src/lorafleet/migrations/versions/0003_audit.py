"""Audit log and per-tenant quotas: `audit_events` (append-only), `tenants.max_runs`,
`tenants.max_queued`, `tenants.max_adapters`.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

`audit_events` records who moved an alias, rolled one back, deleted a policy or a revision,
created or revoked a key, or deleted a tenant, and when, from what to what. Each row is written
in the same transaction as the change it records, and triggers refuse any UPDATE or DELETE of
it (as for `alias_events`, migration 0001). The quota columns are NULL for "the server default".
Plain CREATE TABLE / ADD COLUMN on both SQLite and PostgreSQL: nothing is rebuilt.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_FROZEN = (("audit_events", "UPDATE"), ("audit_events", "DELETE"))
_QUOTAS = ("max_runs", "max_queued", "max_adapters")


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("target", sa.String(length=512), nullable=False),
        sa.Column("from_value", sa.String(length=512), nullable=True),
        sa.Column("to_value", sa.String(length=512), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_events_tenant", "audit_events", ["tenant", "id"], unique=False)
    for col in _QUOTAS:
        op.add_column("tenants", sa.Column(col, sa.Integer(), nullable=True))
    dialect = op.get_bind().dialect.name
    for table, operation in _FROZEN:
        name = f"{table}_no_{operation.lower()}"
        if dialect == "postgresql":  # lorafleet_immutable() comes from 0001
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
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}" if dialect == "postgresql"
                   else f"DROP TRIGGER IF EXISTS {name}")
    for col in reversed(_QUOTAS):
        op.drop_column("tenants", col)
    op.drop_index("ix_audit_events_tenant", table_name="audit_events")
    op.drop_table("audit_events")
