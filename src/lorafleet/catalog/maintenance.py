"""Catalog upkeep: garbage collection and the consistency check (fsck)."""

from __future__ import annotations

from datetime import datetime

from lorafleet.catalog import repo
from lorafleet.catalog.records import CheckReport, GcReport
from lorafleet.db import Database
from lorafleet.errors import Corrupt, NotFound
from lorafleet.store.blobs import BlobStore
from lorafleet.store.manifest import BlobRef


def gc(db: Database, store: BlobStore, now: datetime, grace_s: float) -> GcReport:
    """Delete expired revisions no alias points at, then unreferenced blobs older than
    `grace_s` (a younger one may belong to a publish whose row has not committed yet), then
    temp files left by crashed writers."""
    with db.write() as conn:
        expired = repo.expired_revisions(conn, now)
        for rid, aliased in expired:
            if not aliased:
                repo.delete_revision(conn, rid)
    with db.read() as conn:
        referenced = repo.referenced_blobs(conn)
    deleted = freed = 0
    cutoff = now.timestamp() - grace_s
    for sha, mtime in list(store.list_blobs()):
        if sha not in referenced and mtime <= cutoff:
            freed += _size(store, sha)
            store.delete(sha)
            deleted += 1
    tmp = store.sweep_tmp(grace_s)
    kept = sum(1 for _, aliased in expired if aliased)
    return GcReport(len(expired) - kept, kept, deleted, freed, tmp)


def check(db: Database, store: BlobStore, verify_bytes: bool = True) -> CheckReport:
    """Every revision has files; every file's blob is present and (verify_bytes) hash-matching."""
    with db.read() as conn:
        files = list(repo.all_files(conn))
        empty = repo.revisions_without_files(conn)
        n = repo.count_revisions(conn)
        referenced = repo.referenced_blobs(conn)
    problems = [f"revision {rid} has no files" for rid in empty]
    seen: dict[str, str | None] = {}
    for rid, name, sha, size in files:
        if sha not in seen:
            seen[sha] = blob_problem(store, BlobRef(sha, size), verify_bytes)
        if seen[sha]:
            problems.append(f"revision {rid} file {name}: {seen[sha]}")
    stray = sum(1 for sha, _ in store.list_blobs() if sha not in referenced)
    return CheckReport(n, tuple(problems), stray)


def blob_problem(store: BlobStore, ref: BlobRef, verify_bytes: bool) -> str | None:
    """What is wrong with one stored blob (None: nothing); also used by Tinker checkpoint fsck."""
    try:
        if verify_bytes:
            store.verify(ref)
        elif not store.exists(ref.sha256):
            return f"blob {ref.sha256} missing"
    except (NotFound, Corrupt) as e:
        return str(e)
    return None


def _size(store: BlobStore, sha: str) -> int:
    path = getattr(store, "path", None)  # only the local store knows sizes cheaply
    try:
        return int(path(sha).stat().st_size) if path else 0
    except OSError:
        return 0
