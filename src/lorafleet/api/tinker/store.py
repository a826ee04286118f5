"""SQLite persistence of the Tinker service's own records: sessions, training runs, samplers,
checkpoints and futures.

One file (`<home>/tinker.db`, WAL) that survives restarts, so REST listings, checkpoint paths
and undelivered results outlive the process. Rows are plain dicts; JSON columns hold metadata.
Thread-safe (one connection behind a lock): the HTTP edge and the engine thread both write.
Checkpoint *files* live next to it (see `checkpoints.py`); adapter tensors never enter here.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
  session_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, created REAL NOT NULL,
  last_heartbeat REAL NOT NULL, finished TEXT, user_metadata TEXT, display_name TEXT,
  tags TEXT, sdk_version TEXT, project_id TEXT
);
CREATE TABLE IF NOT EXISTS runs (
  model_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, session_id TEXT NOT NULL,
  base_model TEXT NOT NULL, lora TEXT NOT NULL, user_metadata TEXT,
  created REAL NOT NULL, last_request REAL NOT NULL, step INTEGER NOT NULL DEFAULT 0,
  corrupted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS samplers (
  sampler_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, session_id TEXT NOT NULL,
  base_model TEXT NOT NULL, model_path TEXT, source_model_id TEXT, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
  tinker_path TEXT PRIMARY KEY, tenant TEXT NOT NULL, model_id TEXT NOT NULL,
  kind TEXT NOT NULL, name TEXT NOT NULL, dir TEXT NOT NULL, size_bytes INTEGER,
  public INTEGER NOT NULL DEFAULT 0, expires_at REAL, created REAL NOT NULL,
  user_metadata TEXT, meta TEXT
);
CREATE TABLE IF NOT EXISTS futures (
  request_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, kind TEXT NOT NULL,
  scope TEXT, seq_id INTEGER, idem_key TEXT, fingerprint TEXT, state TEXT NOT NULL,
  content_type TEXT, payload BLOB, error TEXT, category TEXT,
  created REAL NOT NULL, completed REAL, delivered REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS futures_scope_seq ON futures(scope, seq_id)
  WHERE scope IS NOT NULL AND seq_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS futures_idem ON futures(idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS futures_state ON futures(state);
"""

# (table, column) added after the first release: ALTERed into an older tinker.db on open
ADDED_COLUMNS = (("sessions", "project_id"),)
_JSON_COLUMNS = frozenset({"user_metadata", "tags", "lora", "meta"})


class TinkerStore:
    """Rows of the Tinker service; `path=":memory:"` for tests without durability."""

    def __init__(self, path: str | Path) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            for table, column in ADDED_COLUMNS:  # columns newer than a store's file
                have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")

    # ------------------------------------------------------------------ generic helpers

    def insert(self, table: str, row: dict[str, Any]) -> None:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._lock:
            self._db.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", _encode(row))

    def update(self, table: str, key: str, value: Any, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(
                f"UPDATE {table} SET {sets} WHERE {key} = ?", [*_encode(fields), value]
            )

    def get(self, table: str, key: str, value: Any) -> dict[str, Any] | None:
        rows = self.select(f"SELECT * FROM {table} WHERE {key} = ?", value)
        return rows[0] if rows else None

    def select(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_decode(dict(r)) for r in rows]

    def execute(self, sql: str, *args: Any) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _encode(row: dict[str, Any]) -> list[Any]:
    return [json.dumps(v) if k in _JSON_COLUMNS and v is not None else v for k, v in row.items()]


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    for k in _JSON_COLUMNS & row.keys():
        if row[k] is not None:
            row[k] = json.loads(row[k])
    return row


def now() -> float:
    return time.time()
