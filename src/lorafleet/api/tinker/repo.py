"""The one repository of the Tinker service's state: sessions, runs, samplers, checkpoints,
futures and run metrics, over the catalog's database (catalog/tinker_tables.py).

Tenant scoping lives here: every lookup a client's request makes takes the tenant and answers
None for another tenant's row, exactly as for a missing one (existence is never confirmed).
The few unscoped reads (`*_by_id`) are for the server's own bookkeeping: the engine's sink,
retention and recovery. Rows are plain dicts (column -> value; JSON columns decoded).

SQLite (the embedded default) or PostgreSQL: several API servers over one PostgreSQL share
everything here. Every method is one short transaction; `Database.write()` takes SQLite's
write lock up front (db.py), so concurrent servers and threads never deadlock.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Connection, Table, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from lorafleet.catalog import tinker_tables as tt
from lorafleet.db import Database
from lorafleet.errors import Conflict
from lorafleet.store.manifest import BlobRef

PENDING, DONE, FAILED, EXPIRED = "pending", "done", "failed", "expired"


def now() -> float:
    return time.time()


def idem_hash(key: str | None) -> str | None:
    """How an idempotency key is stored: its sha256 (any length of header fits the index)."""
    return None if not key else hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _row(r: Any) -> dict[str, Any] | None:
    return None if r is None else dict(r._mapping)


class TinkerRepo:
    """Queries and writes of the Tinker tables; thread-safe (a connection per call)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # ------------------------------------------------------------------ generic

    def _get(self, table: Table, key: str, value: Any, tenant: str | None = None) -> dict[str, Any] | None:
        stmt = select(table).where(table.c[key] == value)
        if tenant is not None:
            stmt = stmt.where(table.c.tenant == tenant)
        with self.db.read() as conn:
            return _row(conn.execute(stmt).first())

    def _insert(self, table: Table, row: Mapping[str, Any], what: str) -> None:
        try:
            with self.db.write() as conn:
                conn.execute(insert(table).values(**row))
        except IntegrityError as e:
            raise Conflict(f"{what} already exists") from e

    def _update(self, table: Table, key: str, value: Any, **fields: Any) -> int:
        with self.db.write() as conn:
            return conn.execute(update(table).where(table.c[key] == value).values(**fields)).rowcount

    # ------------------------------------------------------------------ sessions

    def insert_session(self, row: Mapping[str, Any]) -> None:
        self._insert(tt.tinker_sessions, row, f"session {row['session_id']}")

    def session(self, tenant: str, session_id: str) -> dict[str, Any] | None:
        return self._get(tt.tinker_sessions, "session_id", session_id, tenant)

    def touch_session(self, session_id: str) -> None:
        self._update(tt.tinker_sessions, "session_id", session_id, last_heartbeat=now())

    def finish_session(self, session_id: str, reason: str) -> None:
        s = tt.tinker_sessions.c
        with self.db.write() as conn:
            conn.execute(update(tt.tinker_sessions).where(s.session_id == session_id, s.finished.is_(None))
                         .values(finished=reason))

    def silent_sessions(self, before: float) -> list[str]:
        """Open sessions whose last heartbeat is older than `before`."""
        s = tt.tinker_sessions.c
        with self.db.read() as conn:
            return list(conn.execute(select(s.session_id).where(s.finished.is_(None), s.last_heartbeat < before))
                        .scalars())

    def sessions(self, tenant: str, limit: int, offset: int) -> list[str]:
        s = tt.tinker_sessions.c
        stmt = (select(s.session_id).where(s.tenant == tenant).order_by(s.created.desc(), s.session_id)
                .limit(limit).offset(offset))
        with self.db.read() as conn:
            return list(conn.execute(stmt).scalars())

    def session_by_id(self, session_id: str) -> dict[str, Any] | None:
        """Unscoped: for a signed URL, which names its session and carries no API key."""
        return self._get(tt.tinker_sessions, "session_id", session_id)

    def set_session_project(self, tenant: str, session_id: str, project_id: str) -> bool:
        """Move one of the tenant's sessions into a project; False when it has no such session."""
        s = tt.tinker_sessions.c
        with self.db.write() as conn:
            return conn.execute(update(tt.tinker_sessions).where(s.session_id == session_id, s.tenant == tenant)
                                .values(project_id=project_id)).rowcount > 0

    def tenant_sessions(self, tenant: str) -> list[dict[str, Any]]:
        """Every session of the tenant, newest first (session search filters them)."""
        s = tt.tinker_sessions.c
        stmt = select(tt.tinker_sessions).where(s.tenant == tenant).order_by(s.created.desc(), s.session_id.desc())
        with self.db.read() as conn:
            return [dict(x._mapping) for x in conn.execute(stmt)]

    def session_checkpoint_totals(self, tenant: str, session_ids: Iterable[str]) -> dict[str, tuple[int, int]]:
        """session id -> (checkpoints, bytes) of the tenant's checkpoints of those sessions' runs."""
        ids = list(session_ids)
        if not ids:
            return {}
        c, r = tt.tinker_checkpoints.c, tt.tinker_runs.c
        stmt = (select(r.session_id, func.count(), func.coalesce(func.sum(c.size_bytes), 0))
                .select_from(tt.tinker_checkpoints.join(tt.tinker_runs, r.model_id == c.model_id))
                .where(r.session_id.in_(ids), c.tenant == tenant).group_by(r.session_id))
        with self.db.read() as conn:
            return {sid: (int(n), int(b)) for sid, n, b in conn.execute(stmt)}

    def insert_finished_run(self, session: Mapping[str, Any], run: Mapping[str, Any]) -> None:
        """A finished session and its one run, together (an upload, interpolation or copy: a run
        that holds a checkpoint and is never trained itself)."""
        try:
            with self.db.write() as conn:
                conn.execute(insert(tt.tinker_sessions).values(**session))
                conn.execute(insert(tt.tinker_runs).values(**{"step": 0, "corrupted": False, **run}))
        except IntegrityError as e:
            raise Conflict(f"training run {run['model_id']} already exists") from e

    def delete_run(self, tenant: str, model_id: str, session_id: str | None = None) -> None:
        """Undo `insert_run`/`insert_finished_run` when the checkpoint it was made for failed to
        commit (with `session_id`: that session too)."""
        r, s = tt.tinker_runs.c, tt.tinker_sessions.c
        with self.db.write() as conn:
            conn.execute(delete(tt.tinker_runs).where(r.model_id == model_id, r.tenant == tenant))
            if session_id is not None:
                conn.execute(delete(tt.tinker_sessions).where(s.session_id == session_id, s.tenant == tenant))

    # ------------------------------------------------------------------ runs

    def insert_run(self, row: Mapping[str, Any]) -> None:
        self._insert(tt.tinker_runs, {"step": 0, "corrupted": False, **row}, f"training run {row['model_id']}")

    def run(self, tenant: str, model_id: str) -> dict[str, Any] | None:
        return self._get(tt.tinker_runs, "model_id", model_id, tenant)

    def run_by_id(self, model_id: str) -> dict[str, Any] | None:
        return self._get(tt.tinker_runs, "model_id", model_id)

    def update_run(self, model_id: str, **fields: Any) -> None:
        self._update(tt.tinker_runs, "model_id", model_id, **fields)

    def clear_run_flag(self, model_id: str, flag: str) -> None:
        """Drop one key of a run's `lora` flags (e.g. reverse_kl once a save recorded it)."""
        row = self.run_by_id(model_id)
        if row is not None and flag in (row["lora"] or {}):
            self.update_run(model_id, lora={k: v for k, v in row["lora"].items() if k != flag})

    def runs(self, tenant: str, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        """A page of the tenant's runs, newest first, and how many it has in all."""
        r = tt.tinker_runs.c
        page = (select(tt.tinker_runs).where(r.tenant == tenant).order_by(r.created.desc(), r.model_id)
                .limit(limit).offset(offset))
        with self.db.read() as conn:
            rows = [dict(x._mapping) for x in conn.execute(page)]
            total = conn.execute(select(func.count()).select_from(tt.tinker_runs).where(r.tenant == tenant))
            return rows, int(total.scalar_one())

    def runs_of_session(self, session_id: str) -> list[dict[str, Any]]:
        r = tt.tinker_runs.c
        with self.db.read() as conn:
            return [dict(x._mapping) for x in conn.execute(
                select(tt.tinker_runs).where(r.session_id == session_id).order_by(r.created))]

    def open_runs(self, tenant: str) -> int:
        """The tenant's runs in sessions that have not finished (the max_runs quota)."""
        r, s = tt.tinker_runs.c, tt.tinker_sessions.c
        stmt = (select(func.count()).select_from(tt.tinker_runs.join(
            tt.tinker_sessions, s.session_id == r.session_id)).where(r.tenant == tenant, s.finished.is_(None)))
        with self.db.read() as conn:
            return int(conn.execute(stmt).scalar_one())

    def finished_runs(self, model_ids: Iterable[str]) -> list[str]:
        """Those of `model_ids` whose session has finished (through any server)."""
        ids = list(model_ids)
        if not ids:
            return []
        r, s = tt.tinker_runs.c, tt.tinker_sessions.c
        stmt = (select(r.model_id).select_from(tt.tinker_runs.join(tt.tinker_sessions, s.session_id == r.session_id))
                .where(r.model_id.in_(ids), s.finished.is_not(None)))
        with self.db.read() as conn:
            return list(conn.execute(stmt).scalars())

    # ------------------------------------------------------------------ samplers

    def insert_sampler(self, row: Mapping[str, Any]) -> bool:
        """Insert unless the id exists; returns whether this call inserted it."""
        try:
            self._insert(tt.tinker_samplers, row, "sampler")
            return True
        except Conflict:
            return False

    def sampler(self, tenant: str, sampler_id: str) -> dict[str, Any] | None:
        return self._get(tt.tinker_samplers, "sampler_id", sampler_id, tenant)

    def sampler_by_id(self, sampler_id: str) -> dict[str, Any] | None:
        return self._get(tt.tinker_samplers, "sampler_id", sampler_id)

    def ids_of_session(self, session_id: str) -> tuple[list[str], list[str]]:
        """(training run ids, sampler ids) of a session, oldest first."""
        r, s = tt.tinker_runs.c, tt.tinker_samplers.c
        with self.db.read() as conn:
            runs = conn.execute(select(r.model_id).where(r.session_id == session_id).order_by(r.created))
            samplers = conn.execute(select(s.sampler_id).where(s.session_id == session_id).order_by(s.created))
            return list(runs.scalars()), list(samplers.scalars())

    # ------------------------------------------------------------------ checkpoints

    def insert_checkpoint(self, conn: Connection, row: Mapping[str, Any], files: Mapping[str, BlobRef]) -> None:
        """In the caller's transaction (the catalog's publish, or its own): the row and its blobs."""
        conn.execute(insert(tt.tinker_checkpoints).values(**row))
        conn.execute(insert(tt.tinker_checkpoint_files), [
            {"tinker_path": row["tinker_path"], "filename": name, "sha256": ref.sha256,
             "size_bytes": ref.size_bytes} for name, ref in sorted(files.items())])

    def checkpoint(self, path: str) -> dict[str, Any] | None:
        """Unscoped: callers decide visibility (own, or published)."""
        return self._get(tt.tinker_checkpoints, "tinker_path", path)

    def checkpoint_files(self, path: str) -> dict[str, BlobRef]:
        f = tt.tinker_checkpoint_files.c
        with self.db.read() as conn:
            rows = conn.execute(select(f.filename, f.sha256, f.size_bytes).where(f.tinker_path == path)
                                .order_by(f.filename))
            return {r.filename: BlobRef(r.sha256, r.size_bytes) for r in rows}

    def checkpoints(self, tenant: str, model_id: str | None = None) -> list[dict[str, Any]]:
        c = tt.tinker_checkpoints.c
        stmt = select(tt.tinker_checkpoints).where(c.tenant == tenant)
        if model_id is not None:
            stmt = stmt.where(c.model_id == model_id)
        with self.db.read() as conn:
            return [dict(x._mapping) for x in conn.execute(stmt.order_by(c.created, c.tinker_path))]

    def delete_checkpoint(self, path: str) -> None:
        """The row and its file rows (cascade); the blobs go at the catalog's next gc."""
        f, c = tt.tinker_checkpoint_files.c, tt.tinker_checkpoints.c
        with self.db.write() as conn:
            conn.execute(delete(tt.tinker_checkpoint_files).where(f.tinker_path == path))
            conn.execute(delete(tt.tinker_checkpoints).where(c.tinker_path == path))

    def update_checkpoint(self, path: str, **fields: Any) -> None:
        self._update(tt.tinker_checkpoints, "tinker_path", path, **fields)

    def expired_checkpoints(self, at: float) -> list[dict[str, Any]]:
        c = tt.tinker_checkpoints.c
        with self.db.read() as conn:
            return [dict(x._mapping) for x in conn.execute(
                select(tt.tinker_checkpoints).where(c.expires_at.is_not(None), c.expires_at < at))]

    def all_checkpoint_files(self) -> list[tuple[str, str, BlobRef]]:
        """(tinker path, filename, blob) of every checkpoint, for fsck."""
        f = tt.tinker_checkpoint_files.c
        with self.db.read() as conn:
            return [(r.tinker_path, r.filename, BlobRef(r.sha256, r.size_bytes))
                    for r in conn.execute(select(f.tinker_path, f.filename, f.sha256, f.size_bytes))]

    def checkpoint_paths(self) -> list[str]:
        with self.db.read() as conn:
            return list(conn.execute(select(tt.tinker_checkpoints.c.tinker_path)).scalars())

    # ------------------------------------------------------------------ futures

    def insert_future(self, row: Mapping[str, Any]) -> bool:
        """Insert a pending future; False when its (scope, seq_id) or idempotency key is taken
        (a concurrent duplicate, perhaps through another server)."""
        try:
            with self.db.write() as conn:
                conn.execute(insert(tt.tinker_futures).values(**row))
            return True
        except IntegrityError:
            return False

    def future(self, request_id: str) -> dict[str, Any] | None:
        return self._get(tt.tinker_futures, "request_id", request_id)

    def future_state(self, request_id: str) -> tuple[str, str | None] | None:
        """(state, owner) of a future: the cheap read a poll repeats."""
        f = tt.tinker_futures.c
        with self.db.read() as conn:
            r = conn.execute(select(f.state, f.owner).where(f.request_id == request_id)).first()
        return None if r is None else (r.state, r.owner)

    def duplicate_future(self, tenant: str, scope: str | None, seq_id: int | None,
                         idem: str | None) -> dict[str, Any] | None:
        f = tt.tinker_futures.c
        with self.db.read() as conn:
            if scope is not None and seq_id is not None:
                row = conn.execute(select(tt.tinker_futures).where(f.scope == scope, f.seq_id == seq_id)).first()
                if row is not None:
                    return dict(row._mapping)
            if idem:
                row = conn.execute(select(tt.tinker_futures).where(f.idem_key == idem, f.tenant == tenant)).first()
                if row is not None:
                    return dict(row._mapping)
        return None

    def futures_of_scopes(self, tenant: str, scopes: Iterable[str]) -> list[dict[str, Any]]:
        """(kind, scope, state, created, completed) of the tenant's futures in those ordering
        scopes, oldest first: a session's trace."""
        f = tt.tinker_futures.c
        keys = list(scopes)
        if not keys:
            return []
        stmt = (select(f.kind, f.scope, f.state, f.created, f.completed)
                .where(f.tenant == tenant, f.scope.in_(keys)).order_by(f.created))
        with self.db.read() as conn:
            return [dict(x._mapping) for x in conn.execute(stmt)]

    def pending_count(self, tenant: str) -> int:
        f = tt.tinker_futures.c
        with self.db.read() as conn:
            return int(conn.execute(select(func.count()).select_from(tt.tinker_futures)
                                    .where(f.tenant == tenant, f.state == PENDING)).scalar_one())

    def delete_future(self, request_id: str) -> None:
        with self.db.write() as conn:
            conn.execute(delete(tt.tinker_futures).where(tt.tinker_futures.c.request_id == request_id))

    def finish_future(self, request_id: str, **fields: Any) -> None:
        """Complete or fail a pending future (a lost one stays as recovery marked it)."""
        f = tt.tinker_futures.c
        with self.db.write() as conn:
            conn.execute(update(tt.tinker_futures).where(f.request_id == request_id, f.state == PENDING)
                         .values(completed=now(), **fields))

    def mark_delivered(self, request_id: str) -> None:
        f = tt.tinker_futures.c
        with self.db.write() as conn:
            conn.execute(update(tt.tinker_futures).where(f.request_id == request_id, f.delivered.is_(None))
                         .values(delivered=now()))

    def pending_owners(self) -> set[str | None]:
        f = tt.tinker_futures.c
        with self.db.read() as conn:
            return set(conn.execute(select(f.owner).where(f.state == PENDING).distinct()).scalars())

    def fail_pending_of(self, owner: str | None, error: str) -> int:
        """Fail every pending future of a server instance that is gone (None: futures from
        before migration 0004, which no live server owns)."""
        f = tt.tinker_futures.c
        who = f.owner.is_(None) if owner is None else f.owner == owner
        with self.db.write() as conn:
            return conn.execute(update(tt.tinker_futures).where(f.state == PENDING, who).values(
                state=FAILED, error=error, category="server", completed=now())).rowcount

    def expire_futures(self, delivered_before: float, completed_before: float, tombstones_before: float) -> int:
        """Drop payloads past retention (tombstones answer 410); delete old tombstones."""
        f = tt.tinker_futures.c
        delivered = f.delivered.is_not(None) & (f.delivered < delivered_before)
        undelivered = f.delivered.is_(None) & (f.completed < completed_before)
        with self.db.write() as conn:
            n = conn.execute(update(tt.tinker_futures).where(f.state.in_((DONE, FAILED)), delivered | undelivered)
                             .values(state=EXPIRED, payload=None)).rowcount
            conn.execute(delete(tt.tinker_futures).where(f.state == EXPIRED, f.completed < tombstones_before))
        return n

    # ------------------------------------------------------------------ run metrics

    def insert_metrics(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            with self.db.write() as conn:
                conn.execute(insert(tt.tinker_run_metrics), rows)

    def metrics(self, model_id: str, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` points of a run, oldest first."""
        m = tt.tinker_run_metrics.c
        stmt = (select(m.id, m.step, m.kind, m.name, m.value).where(m.model_id == model_id)
                .order_by(m.id.desc()).limit(limit))
        with self.db.read() as conn:
            return [dict(x._mapping) for x in reversed(conn.execute(stmt).all())]

    # ------------------------------------------------------------------ settings

    def secret(self, name: str, size: int = 32) -> bytes:
        """A random secret shared by every server on this database, made on first use."""
        s = tt.tinker_settings.c
        with self.db.read() as conn:
            value = conn.execute(select(s.value).where(s.name == name)).scalar_one_or_none()
        if value is None:
            try:
                with self.db.write() as conn:
                    conn.execute(insert(tt.tinker_settings).values(name=name, value=secrets.token_bytes(size)))
            except IntegrityError:  # another server made it first
                pass
            with self.db.read() as conn:
                value = conn.execute(select(s.value).where(s.name == name)).scalar_one()
        return bytes(value)
