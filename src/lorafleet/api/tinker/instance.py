"""This API server process's identity in the shared Tinker state, and whether another is alive.

Every future records the server instance computing it (`tinker_futures.owner`). When that
process dies its futures can never finish, so any server that finds them (at start, in its
janitor, or while a client polls one) fails them with an error instead of letting clients
wait forever. Liveness is a lock the owner holds for as long as it runs, which the operating
system or the database releases the moment the process dies, even on SIGKILL:

- PostgreSQL: a session-level advisory lock on a connection held open (two-key form, so it
  never meets the migration lock of db.py); others look it up in `pg_locks`;
- SQLite (one machine by construction): an exclusive `flock` on a file beside the database;
  others try to take it without blocking.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import uuid
from pathlib import Path

from sqlalchemy import Connection, text

from lorafleet.db import Database

LOCK_CLASS = 7340022  # advisory lock namespace of server instances (the migration lock is 7340021)


def _key(instance_id: str) -> int:
    return int.from_bytes(hashlib.sha256(instance_id.encode()).digest()[:4], "big", signed=True)


class Instance:
    """Holds this process's liveness lock until `close()`."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.id = f"srv-{uuid.uuid4().hex[:20]}"
        self._conn: Connection | None = None
        self._fd: int | None = None
        self._dir: Path | None = None
        if db.dialect == "postgresql":
            self._conn = db.writer.connect()
            self._conn.execute(text("SELECT pg_advisory_lock(:c, :k)"), dict(c=LOCK_CLASS, k=_key(self.id)))
            self._conn.commit()
        elif db.dialect == "sqlite" and db.url.database and db.url.database != ":memory:":
            self._dir = Path(f"{db.url.database}.servers")
            self._dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self._dir / f"{self.id}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def alive(self, other: str | None) -> bool:
        """Whether the server instance `other` still runs (None: a future from before 0004)."""
        if other is None:
            return False
        if other == self.id:
            return True
        if self._conn is not None:
            with self.db.reader.connect() as conn:
                held = conn.execute(text(
                    "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid::bigint = :c AND objid::bigint = :k "
                    "AND objsubid = 2 AND granted AND database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database())"),
                    dict(c=LOCK_CLASS & 0xFFFFFFFF, k=_key(other) & 0xFFFFFFFF)).first()
            return held is not None
        if self._dir is None:  # an in-memory database lives in this process only
            return False
        path = self._dir / f"{other}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock we took
        path.unlink(missing_ok=True)  # a dead instance's file: tidy it
        return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.invalidate()  # closes the session (not back to the pool): the lock goes with it
            self._conn.close()
            self._conn = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            if self._dir is not None:
                (self._dir / f"{self.id}.lock").unlink(missing_ok=True)
