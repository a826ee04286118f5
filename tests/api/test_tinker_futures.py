"""Futures: idempotent submit, 422 on different content, long-poll, retention, restart, and
several servers over one database (a future made through one is retrieved through another)."""

from __future__ import annotations

import asyncio

import pytest

from lorafleet.api.tinker.futures import LOST_AT_RESTART, FutureTable, JSON_TYPE
from lorafleet.api.tinker.instance import Instance
from lorafleet.api.tinker.repo import TinkerRepo, now
from lorafleet.errors import Conflict, Expired, NotFound


def server(catalog, hold_s: float = 0.05) -> FutureTable:
    """The futures of one API server process on `catalog`'s database."""
    return FutureTable(TinkerRepo(catalog.db), Instance(catalog.db), hold_s=hold_s, poll_s=0.01)


@pytest.fixture()
def table(catalog):
    t = server(catalog)
    yield t
    t.instance.close()


def test_submit_dedupes_by_scope_seq_and_idempotency_key(table):
    a, created = table.submit("t", "optim_step", "fp1", scope="m", seq_id=1)
    assert created
    assert table.submit("t", "optim_step", "fp1", scope="m", seq_id=1) == (a, False)
    with pytest.raises(Conflict, match="different request"):
        table.submit("t", "optim_step", "fp2", scope="m", seq_id=1)
    b, _ = table.submit("t", "sample", "x", idem_key="k1")
    assert table.submit("t", "sample", "x", idem_key="k1") == (b, False)
    with pytest.raises(Conflict):
        table.submit("t", "sample", "y", idem_key="k1")
    c, created = table.submit("other", "sample", "y", idem_key="k1")  # keys are per tenant
    assert created and c != b
    long_key = "k" * 10_000  # any header length fits: keys are stored hashed
    d, _ = table.submit("t", "sample", "z", idem_key=long_key)
    assert table.submit("t", "sample", "z", idem_key=long_key) == (d, False)


def test_long_poll_wakes_on_completion_from_another_thread(table):
    rid, _ = table.submit("t", "create_model", "fp", scope="s", seq_id=0)

    async def main():
        table.bind_loop(asyncio.get_running_loop())
        assert await table.wait(rid, "t") is None  # try again after hold_s
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, lambda: loop.run_in_executor(
            None, table.complete, rid, b'{"ok": 1}', JSON_TYPE))
        return await table.wait(rid, "t", hold_s=5)

    res = asyncio.run(main())
    assert res.state == "done" and res.payload == b'{"ok": 1}'


def test_other_tenant_and_unknown_are_not_found(table):
    rid, _ = table.submit("t", "x", "fp")
    with pytest.raises(NotFound):
        asyncio.run(table.wait(rid, "someone-else"))
    with pytest.raises(NotFound):
        asyncio.run(table.wait("req-nope", "t"))


def test_retention_keeps_results_five_minutes_after_delivery_then_410(table):
    rid, _ = table.submit("t", "x", "fp")
    table.complete(rid, b"{}", JSON_TYPE)
    assert asyncio.run(table.wait(rid, "t")).state == "done"  # delivered now
    assert table.expire(at=now() + 299) == 0
    assert asyncio.run(table.wait(rid, "t")).state == "done"  # a re-poll still gets it
    assert table.expire(at=now() + 301) == 1
    with pytest.raises(Expired):
        asyncio.run(table.wait(rid, "t"))
    und, _ = table.submit("t", "x", "fp2")
    table.complete(und, b"{}", JSON_TYPE)
    assert table.expire(at=now() + 600) == 0  # undelivered results are kept much longer


def test_recover_fails_work_lost_at_restart(catalog):
    first = server(catalog)
    rid, _ = first.submit("t", "x", "fp")
    first.instance.close()  # the process ends (a SIGKILL drops the lock just the same)
    again = server(catalog)
    assert again.recover() == 1
    res = asyncio.run(again.wait(rid, "t"))
    assert res.state == "failed" and res.error == LOST_AT_RESTART and res.category == "server"
    again.instance.close()


def test_a_future_made_through_one_server_is_retrieved_through_another(catalog):
    a, b = server(catalog), server(catalog, hold_s=0.2)
    try:
        rid, _ = a.submit("t", "optim_step", "fp", scope="run", seq_id=1)
        assert b.submit("t", "optim_step", "fp", scope="run", seq_id=1) == (rid, False)  # one future
        assert b.recover() == 0  # a's work is alive: starting b must not fail it

        async def poll_on_b():
            assert await b.wait(rid, "t") is None  # pending on a: b polls the database
            loop = asyncio.get_running_loop()
            loop.call_later(0.05, lambda: loop.run_in_executor(None, a.complete, rid, b'{"n": 2}', JSON_TYPE))
            return await b.wait(rid, "t", hold_s=10)

        res = asyncio.run(poll_on_b())
        assert res.state == "done" and res.payload == b'{"n": 2}'
        with pytest.raises(NotFound):  # tenant scoping holds across servers
            asyncio.run(b.wait(rid, "other"))
    finally:
        a.instance.close()
        b.instance.close()


def test_a_poll_on_another_server_fails_a_dead_servers_future_at_once(catalog):
    a, b = server(catalog), server(catalog, hold_s=30)
    rid, _ = a.submit("t", "forward_backward", "fp")
    assert b.instance.alive(a.instance.id)
    a.instance.close()  # a dies with the work in flight
    assert not b.instance.alive(a.instance.id)

    async def poll():
        return await asyncio.wait_for(b.wait(rid, "t"), 10)  # never the 30 s hold

    res = asyncio.run(poll())
    assert res.state == "failed" and res.error == LOST_AT_RESTART
    b.instance.close()
