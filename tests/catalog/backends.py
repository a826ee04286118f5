"""Catalog database backends for tests: a fresh SQLite file, or a fresh PostgreSQL schema.

PostgreSQL (127.0.0.1:5432, trust auth, database `test`) is required: its variants fail if
the server is unreachable, unless LORAFLEET_SKIP_PG=1 (then they skip).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PG_SERVER = os.environ.get("LORAFLEET_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKENDS = ("sqlite", "postgresql")


def _pg_connect():  # type: ignore[no-untyped-def]
    import psycopg

    dsn = PG_SERVER.replace("postgresql+psycopg://", "postgresql://")
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        if os.environ.get("LORAFLEET_SKIP_PG") == "1":
            pytest.skip(f"PostgreSQL unreachable and LORAFLEET_SKIP_PG=1: {e}")
        raise RuntimeError(
            f"PostgreSQL at {PG_SERVER} is unreachable ({e}); the catalog tests need it. "
            "Start it, or set LORAFLEET_SKIP_PG=1 to skip the PostgreSQL variants locally."
        ) from e


@contextmanager
def database_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty catalog database, dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / f'catalog-{uuid.uuid4().hex[:8]}.db'}"
        return
    schema = f"lf_test_{uuid.uuid4().hex[:12]}"
    with _pg_connect() as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{PG_SERVER}?options=-csearch_path%3D{schema}"
    finally:
        with _pg_connect() as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
