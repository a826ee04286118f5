"""The packaged Alembic migrations produce exactly the schema catalog/tables.py declares."""

from __future__ import annotations

import multiprocessing as mp
from datetime import UTC, datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import text

from lorafleet.catalog import Catalog
from lorafleet.catalog.service import hash_key
from lorafleet.catalog.tables import metadata
from lorafleet.db import MIGRATIONS, open_database, upgrade
from lorafleet.errors import Unauthorized


def test_migrated_schema_matches_tables(db_url):
    db = open_database(db_url)
    upgrade(db)
    upgrade(db)  # a second open is a no-op
    with db.writer.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert MigrationContext.configure(conn).get_current_revision() == "0004"
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


def _migrate(db, target: str, down: bool = False) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with db.writer.connect() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, target)
        conn.commit()


def test_upgrade_from_0001_keeps_keys_working(db_url, tmp_path):
    """A catalog made by 0001 upgrades in place: its keys still authenticate, are listed
    (without a prefix: a hash cannot give it back) and can be revoked; tenants can be deleted."""
    db = open_database(db_url)
    _migrate(db, "0001")
    key = "tml-" + "k" * 43
    now = datetime.now(UTC)
    with db.write() as conn:
        conn.execute(text("INSERT INTO tenants (name, created_at) VALUES ('old', :now), ('gone', :now)"),
                     dict(now=now))
        conn.execute(text("INSERT INTO api_keys (key_hash, tenant, label, created_at) VALUES "
                          "(:h, 'old', 'legacy', :now), (:h2, 'gone', NULL, :now)"),
                     dict(h=hash_key(key), h2=hash_key(key + "2"), now=now))
    db.dispose()

    cat = Catalog.open(db_url, str(tmp_path / "store"))  # migrates to head
    try:
        assert cat.principal_for_key(key).tenant == "old"
        [legacy] = cat.list_keys("old")
        assert (legacy.id, legacy.prefix, legacy.label) == ("key_" + hash_key(key)[:16], None, "legacy")
        cat.delete_tenant("gone")
        with pytest.raises(Unauthorized):
            cat.principal_for_key(key + "2")
        cat.revoke_key(legacy.id)
        with pytest.raises(Unauthorized):
            cat.principal_for_key(key)
    finally:
        cat.close()


def test_0002_downgrades_and_upgrades_again(db_url):
    db = open_database(db_url)
    upgrade(db)
    _migrate(db, "0001", down=True)
    with db.writer.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == "0001"
    upgrade(db)
    with db.writer.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    db.dispose()
    assert diff == []


def test_0003_downgrades_and_upgrades_again(db_url):
    """0003 (audit log, quota columns) comes off and goes back on an existing catalog."""
    db = open_database(db_url)
    upgrade(db)
    _migrate(db, "0002", down=True)
    with db.writer.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == "0002"
    upgrade(db)
    with db.writer.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    db.dispose()
    assert diff == []
