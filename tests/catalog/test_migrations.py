"""The packaged Alembic migrations produce exactly the schema catalog/tables.py declares."""

from __future__ import annotations

import multiprocessing as mp

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from lorafleet.catalog.tables import metadata
from lorafleet.db import open_database, upgrade


def test_migrated_schema_matches_tables(db_url):
    db = open_database(db_url)
    upgrade(db)
    upgrade(db)  # a second open is a no-op
    with db.writer.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert MigrationContext.configure(conn).get_current_revision() == "0001"
    db.dispose()
    assert diff == []


def _open(url: str) -> None:
    db = open_database(url)
    upgrade(db)
    db.dispose()


def test_concurrent_first_opens_migrate_once(db_url):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_open, args=(db_url,)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
