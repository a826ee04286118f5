"""Key revocation and tenant deletion: `tenants.deleted_at`, `api_keys.prefix`, an index on
`api_keys.tenant`.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Plain ADD COLUMN / CREATE INDEX on both SQLite and PostgreSQL: no table is rebuilt, so an
existing catalog upgrades in place and its keys keep working (their `prefix` stays NULL: it
cannot be recovered from a hash; they are still listed and revoked by key id).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("api_keys", sa.Column("prefix", sa.String(length=16), nullable=True))
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant"], unique=False)


def downgrade() -> None:
    # DROP COLUMN directly (SQLite >= 3.35): a batch rebuild of `tenants` would trip the
    # foreign keys that point at it.
    op.drop_index("ix_api_keys_tenant", table_name="api_keys")
    op.drop_column("api_keys", "prefix")
    op.drop_column("tenants", "deleted_at")
