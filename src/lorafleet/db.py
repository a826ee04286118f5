"""Database engines for the catalog, and schema upgrades via the packaged Alembic migrations.

SQLite (the embedded default) runs in WAL mode with a busy timeout and foreign keys on. Its
write transactions start with `BEGIN IMMEDIATE`, taking the write lock up front: with the
driver's default deferred BEGIN, two processes that both read and then write deadlock and one
gets "database is locked" at once, whatever the busy timeout. Reads use a separate engine in
autocommit mode so they never queue behind writers (WAL readers don't block).
PostgreSQL needs neither trick: one engine, READ COMMITTED, row locks where it matters.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.engine import URL

from lorafleet.errors import InvalidRequest

SQLITE_BUSY_TIMEOUT_MS = 60_000  # concurrent publishers wait for the write lock this long
SQLITE_READ_CACHE_KIB = 65_536  # page cache per reader connection
SQLITE_MMAP_BYTES = 1 << 30  # map up to 1 GiB of the file (a 10^6-revision catalog is ~0.5 GiB)
MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger("lorafleet.db")


@dataclass(frozen=True, slots=True)
class Database:
    """A writer engine and a reader engine (the same object except on SQLite)."""

    url: URL
    writer: Engine
    reader: Engine

    @property
    def dialect(self) -> str:
        return self.writer.dialect.name

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction; commits on success, rolls back on any exception."""
        with self.writer.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.reader.connect() as conn:
            yield conn

    def dispose(self) -> None:
        self.writer.dispose()
        if self.reader is not self.writer:
            self.reader.dispose()


def open_database(url: str) -> Database:
    """Engines for `url` (migrations are not run here; see `upgrade`)."""
    try:
        parsed = make_url(url)
    except Exception as e:  # sqlalchemy.exc.ArgumentError and friends
        raise InvalidRequest(f"invalid database URL {url!r}: {e}") from e
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        return Database(parsed, _sqlite_engine(parsed, immediate=True), _sqlite_engine(parsed, immediate=False))
    # No pre-ping: it would add a round trip to every resolve; recycle instead.
    engine = create_engine(parsed, pool_recycle=1800, pool_size=5, max_overflow=10)
    return Database(parsed, engine, engine)


def _sqlite_engine(url: URL, immediate: bool) -> Engine:
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, below
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        # NORMAL in WAL mode: a process crash loses nothing committed; a power cut may lose the
        # last transactions but never corrupts the file. Blobs are fsynced before any commit.
        cur.execute("PRAGMA synchronous=NORMAL")
        if not immediate:  # readers: a larger page cache and mmap keep 10^6-row lookups flat
            cur.execute(f"PRAGMA cache_size=-{SQLITE_READ_CACHE_KIB}")
            cur.execute(f"PRAGMA mmap_size={SQLITE_MMAP_BYTES}")
        cur.close()

    if immediate:
        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    # Readers run in autocommit: each SELECT is its own snapshot. Revisions are immutable, so
    # a resolve's two lookups can at worst miss a revision deleted in between (NotFound).

    return engine


def upgrade(db: Database) -> None:
    """Bring the schema to the newest migration; safe when several processes start at once.

    Quiet when the schema is current; one INFO line when a migration actually runs (Alembic's
    own INFO chatter, nine lines per call, is kept at WARNING)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # before the import: it logs too
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with _migration_lock(db):
        with db.writer.connect() as conn:
            current, heads = _revisions(conn, cfg)
            if current == heads:
                return
            log.info("catalog %s: migrating schema %s -> %s", db.url.render_as_string(hide_password=True),
                     ",".join(sorted(current)) or "(empty)", ",".join(sorted(heads)))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()


def _revisions(conn: Connection, cfg: object) -> tuple[set[str], set[str]]:
    """(current schema revisions, newest migrations)."""
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    heads = set(ScriptDirectory.from_config(cfg).get_heads())  # type: ignore[arg-type]
    current = set(MigrationContext.configure(conn).get_current_heads())
    conn.rollback()
    return current, heads


@contextmanager
def _migration_lock(db: Database) -> Iterator[None]:
    """A PostgreSQL advisory lock, or a lock file next to the SQLite database."""
    if db.dialect == "postgresql":
        with db.writer.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(7340021)"))
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(7340021)"))
                conn.commit()
        return
    path = db.url.database
    if db.dialect != "sqlite" or not path or path == ":memory:":
        yield
        return
    fd = os.open(f"{path}.migrate.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
