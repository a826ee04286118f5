import pytest

from lorafleet.engine.serving import ServeJob, ServingQueue
from lorafleet.engine.types import SampleRequest
from lorafleet.errors import NoCapacity


def job(key, rows=1, t=0.0):
    j = ServeJob(key, [SampleRequest(None, [1], rows)])
    j.submitted = t
    return j


def test_hot_adapter_cannot_starve_others():
    q = ServingQueue(max_rows=8, max_rows_per_adapter=4)
    for i in range(20):
        q.put(job("hot", t=i))
    q.put(job("cold-a", t=5.5))
    q.put(job("cold-b", t=30))
    batch = q.take(max_adapters=8)
    keys = [j.key for j in batch]
    assert keys.count("hot") == 4 and "cold-a" in keys and "cold-b" in keys
    assert len(q) == 16


def test_row_budget_and_adapter_budget():
    q = ServingQueue(max_rows=6, max_rows_per_adapter=6)
    for k in "abcd":
        q.put(job(k, rows=2, t=ord(k)))
    batch = q.take(max_adapters=2)
    assert [j.key for j in batch] == ["a", "b"]  # two distinct adapters fit the free slots
    q.put(job(None, rows=2, t=0))  # the base needs no slot
    batch = q.take(max_adapters=1)
    assert [j.key for j in batch] == [None, "c"]


def test_not_ready_adapters_wait_and_oversized_job_still_runs():
    q = ServingQueue(max_rows=4, max_rows_per_adapter=2)
    q.put(job("big", rows=7, t=0))
    q.put(job("loading", rows=1, t=1))
    batch = q.take(max_adapters=4, ready=lambda k: k != "loading")
    assert [j.key for j in batch] == ["big"]
    assert [j.key for j in q.take(max_adapters=4)] == ["loading"]


def test_bounded():
    q = ServingQueue(max_jobs=2)
    q.put(job("a")), q.put(job("b"))
    with pytest.raises(NoCapacity, match="serving queue is full"):
        q.put(job("c"))


def test_cancelled_jobs_are_dropped_and_never_answered():
    from lorafleet.engine.serving import reject, resolve

    q = ServingQueue()
    gone, kept = job("a", t=0), job("a", t=1)
    q.put(gone)
    q.put(kept)
    assert gone.future.cancel()  # the client closed its stream while the job was queued
    assert q.take(max_adapters=4) == [kept] and len(q) == 0
    resolve(gone.future, [])  # the engine thread answering a cancelled job is a no-op ...
    reject(gone.future, RuntimeError("late"))
    assert gone.future.cancelled()


def test_close_fails_queued_jobs_and_refuses_new_ones():
    q = ServingQueue()
    queued = job("a")
    q.put(queued)
    q.close("the server is shutting down")
    assert isinstance(queued.future.exception(timeout=0), NoCapacity) and len(q) == 0
    with pytest.raises(NoCapacity, match="shutting down"):
        q.put(job("b"))
