"""Crash safety and concurrency with real processes, on SQLite and PostgreSQL.

Children are forked (no interpreter start-up) and open their own Catalog; the parent holds no
connection while they run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time

from lorafleet.catalog import ADMIN, Catalog, Principal
from tests.catalog.conftest import BASE, SPEC, adapter_files

FORK = mp.get_context("fork")
KILLS = 50


def _publish_forever(db_url: str, store_dir: str, seed: int, committed) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    cat = Catalog.open(db_url, store_dir)
    while True:
        weights = rng.randbytes(rng.randint(1, 300_000))
        aliases = ["prod"] if rng.random() < 0.5 else []
        rev = cat.publish(ADMIN, "crash/victim", adapter_files(weights), aliases=aliases)
        committed.set()
        if rng.random() < 0.3:
            cat.set_alias(ADMIN, rev.id, "canary")
        if rng.random() < 0.1:
            cat.gc(grace_s=3600)


def test_sigkill_at_random_points_leaves_catalog_and_store_consistent(db_url, store_dir):
    cat = Catalog.open(db_url, store_dir)
    cat.create_policy(ADMIN, "crash/victim", BASE, SPEC)
    cat.close()
    rng = random.Random(1234)
    for i in range(KILLS):
        # the kill lands at a random point after the child's first commit: on a loaded machine a
        # fixed delay from start() often killed it while it was still opening the catalog
        committed = FORK.Event()
        child = FORK.Process(target=_publish_forever, args=(db_url, store_dir, i, committed))
        child.start()
        assert committed.wait(60), "the publisher committed nothing within 60 s"
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join()
        assert child.exitcode == -signal.SIGKILL, "the publisher died before it was killed"

    cat = Catalog.open(db_url, store_dir)  # the next start
    try:
        report = cat.check()
        assert report.ok, report.problems
        revs = cat.list_revisions(ADMIN, "crash/victim", limit=1000).items
        assert len(revs) >= KILLS, "every child committed before its kill"
        for rev in revs:  # every visible revision is complete and readable
            cat.read_files(ADMIN, rev.id)
        for alias in ("prod", "canary"):
            _assert_history_consistent(cat, f"crash/victim:{alias}")
        print(f"revisions={len(revs)} orphan_blobs={report.unreferenced_blobs}")
        cat.gc(grace_s=0)  # orphans of killed publishes go; nothing referenced does
        after = cat.check()
        assert after.ok and after.unreferenced_blobs == 0
        assert not list((cat.store.root / "tmp").iterdir())
    finally:
        cat.close()


def _assert_history_consistent(cat: Catalog, alias_ref: str) -> list:
    hist = cat.alias_history(ADMIN, alias_ref)
    assert [e.seq for e in hist] == list(range(1, len(hist) + 1))
    assert hist[0].from_revision_id is None
    for prev, cur in zip(hist, hist[1:]):
        assert cur.from_revision_id == prev.to_revision_id
    assert cat.resolve(alias_ref, ADMIN).id == hist[-1].to_revision_id
    return hist


def _contend(db_url: str, store_dir: str, worker: int, rounds: int, out) -> None:  # type: ignore[no-untyped-def]
    cat = Catalog.open(db_url, store_dir)
    who = Principal("team")
    moves = {"prod": 0, "canary": 0}
    for i in range(rounds):
        rev = cat.publish(who, "team/shared", adapter_files(f"{worker}-{i}".encode()), aliases=["prod"])
        moves["prod"] += 1
        cat.set_alias(who, rev.id, "canary")
        moves["canary"] += 1
        if i % 3 == 2:
            cat.rollback(who, "team/shared:prod", reason=f"w{worker}")
            moves["prod"] += 1
    out.put(moves)
    cat.close()


def test_four_processes_moving_the_same_aliases_lose_nothing(db_url, store_dir):
    cat = Catalog.open(db_url, store_dir)
    cat.create_policy(ADMIN, "team/shared", BASE, SPEC)
    cat.close()
    rounds, out = 12, FORK.Queue()
    procs = [FORK.Process(target=_contend, args=(db_url, store_dir, w, rounds, out)) for w in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    cat = Catalog.open(db_url, store_dir)
    try:
        assert len(cat.list_revisions(ADMIN, "team/shared", limit=1000).items) == 4 * rounds
        for alias in ("prod", "canary"):
            hist = _assert_history_consistent(cat, f"team/shared:{alias}")
            assert len(hist) == sum(r[alias] for r in results)  # no lost history entry
        assert cat.check().ok
    finally:
        cat.close()


def _create_many(db_url: str, store_dir: str, worker: int) -> None:
    cat = Catalog.open(db_url, store_dir)
    for i in range(5):
        cat.create_policy(ADMIN, f"newteam{i}/w{worker}", BASE, SPEC)  # tenants appear concurrently
    cat.close()


def test_concurrent_first_policies_of_a_new_tenant(db_url, store_dir):
    Catalog.open(db_url, store_dir).close()
    procs = [FORK.Process(target=_create_many, args=(db_url, store_dir, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cat = Catalog.open(db_url, store_dir)
    assert len(cat.list_policies(ADMIN, limit=100).items) == 20
    cat.close()
