"""Alembic environment: runs on the connection `lorafleet.db.upgrade` passes in.

Also usable from the `alembic` command with `-x url=...` for hand-written migrations.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from lorafleet.catalog.tables import metadata

config = context.config


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    with create_engine(url).connect() as conn:
        _run(conn)
