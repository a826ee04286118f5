"""Futures: idempotent submit, 422 on different content, long-poll, retention, restart."""

from __future__ import annotations

import asyncio

import pytest

from lorafleet.api.tinker.futures import LOST_AT_RESTART, FutureTable, JSON_TYPE
from lorafleet.api.tinker.store import TinkerStore, now
from lorafleet.errors import Conflict, Expired, NotFound


@pytest.fixture()
def table(tmp_path):
    return FutureTable(TinkerStore(tmp_path / "t.db"), hold_s=0.05)


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


def test_recover_fails_work_lost_at_restart(tmp_path):
    store = TinkerStore(tmp_path / "t.db")
    rid, _ = FutureTable(store).submit("t", "x", "fp")
    store.close()
    again = FutureTable(TinkerStore(tmp_path / "t.db"))
    assert again.recover() == 1
    res = asyncio.run(again.wait(rid, "t"))
    assert res.state == "failed" and res.error == LOST_AT_RESTART and res.category == "server"
