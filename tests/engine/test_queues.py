"""SampleQueue fairness and bounds; OrderedQueue sequence and gaps."""

import pytest

from lorafleet.engine.jobs import Job, NullSink, OptimStep, Sample, WorkKind
from lorafleet.engine.queues import OrderedQueue, SampleQueue
from lorafleet.engine.types import SampleRequest
from lorafleet.errors import InvalidRequest, NoCapacity
from lorafleet.train.types import AdamParams


class _Lease:
    def __init__(self, key):
        self.key = key


def job(key, rows=1, t=0.0):
    j = Job(WorkKind.SAMPLE, Sample([SampleRequest(None, [1], rows)], None if key is None else _Lease(key)),
            NullSink())
    j.submitted = t
    return j


def drain(q, running):
    out = []
    while (j := q.pop(lambda k: running.get(k, 0), lambda j: True)) is not None:
        out.append(j.payload.key)
        running[j.payload.key] = running.get(j.payload.key, 0) + j.payload.rows
    return out


def test_hot_adapter_cannot_starve_others():
    q = SampleQueue()
    for i in range(20):
        q.put(job("hot", t=i))
    q.put(job("cold-a", t=5.5))
    q.put(job("cold-b", t=30))
    order = drain(q, {})
    assert order.index("cold-a") <= 2 and order.index("cold-b") <= 3  # not after 20 hot jobs
    assert len(q) == 0


def test_least_served_adapter_goes_first_and_no_overtaking_within_an_adapter():
    q = SampleQueue()
    q.put(job("a", t=0)), q.put(job("a", rows=3, t=1)), q.put(job("b", t=2))
    assert q.pop(lambda k: {"a": 5}.get(k, 0), lambda j: True).payload.key == "b"
    big_first = q.pop(lambda k: 0, lambda j: j.payload.rows == 1)
    assert big_first.payload.key == "a" and big_first.payload.rows == 1
    assert q.pop(lambda k: 0, lambda j: j.payload.rows == 1) is None  # a's 3-row job waits its turn
    assert len(q) == 1


def test_bounded_and_requeues_go_first():
    q = SampleQueue(max_jobs=2)
    q.put(job("a", t=1)), q.put(job("b", t=2))
    with pytest.raises(NoCapacity, match="sampler queue is full"):
        q.put(job("c"))
    q.put(job("a", t=0.5), front=True)  # a requeue is never refused
    assert [j.payload.key for j in q.drain()] == ["a", "a", "b"]


def test_ordered_queue_refuses_reuse_and_skips_gaps():
    q = OrderedQueue("r")
    step = lambda seq: Job(WorkKind.OPTIM_STEP, OptimStep(AdamParams()), NullSink(), run_id="r", seq_id=seq)  # noqa: E731
    q.put(step(2))
    with pytest.raises(InvalidRequest, match="already used"):
        q.put(step(2))
    assert q.head(gap_timeout_s=10, now=0.0) is None  # waiting for seq 1
    assert q.head(gap_timeout_s=10, now=11.0).seq_id == 2  # the gap timed out
    q.pop()
    with pytest.raises(InvalidRequest, match="already used"):
        q.put(step(1))


def test_a_job_with_then_is_followed_by_it_at_the_same_seq_id():
    """A fused train_step: its optim_step runs next, before the run's next seq_id."""
    q = OrderedQueue("r")
    first = Job(WorkKind.FORWARD_BACKWARD, OptimStep(AdamParams()), NullSink(), run_id="r", seq_id=1)
    first.then = Job(WorkKind.OPTIM_STEP, OptimStep(AdamParams()), NullSink(), run_id="r", seq_id=1)
    follower = first.then
    after = Job(WorkKind.FORWARD_BACKWARD, OptimStep(AdamParams()), NullSink(), run_id="r", seq_id=2)
    q.put(first)
    q.put(after)
    assert q.head(5.0) is first and q.pop() is first
    assert q.head(5.0) is follower and q.pop() is follower
    assert q.head(5.0) is after and q.pop() is after and q.next_seq == 3
    with pytest.raises(InvalidRequest, match="already used"):
        q.put(Job(WorkKind.OPTIM_STEP, OptimStep(AdamParams()), NullSink(), run_id="r", seq_id=1))
