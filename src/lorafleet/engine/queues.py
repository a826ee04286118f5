"""Queues of waiting engine work: per-run `seq_id` order for training, one fair queue for sampling.

`OrderedQueue` (one per training run): jobs run strictly in `seq_id` order (a job with a
`then` job is followed by it at the same seq_id). A missing seq_id
blocks its run for `gap_timeout_s` (chunks of one client call arrive concurrently, the first
chunk possibly last), then the hole is skipped and logged.

`SampleQueue`: every sample job, Tinker samples and OpenAI requests alike. Each adapter (key;
None = the base) has its own FIFO; the next job admitted comes from the adapter with the
fewest rows running now, ties broken by the longest-waiting head job, so one hot adapter
never starves the others. Bounded: a full queue answers NoCapacity (HTTP 429 + Retry-After).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from lorafleet.engine.jobs import Job
from lorafleet.errors import InvalidRequest, NoCapacity

log = logging.getLogger(__name__)


@dataclass(slots=True)
class OrderedQueue:
    """The queued ordered jobs of one training run, by seq_id."""

    run_id: str
    next_seq: int = 1
    jobs: dict[int, Job] = field(default_factory=dict)
    gap_since: float | None = None

    def put(self, job: Job) -> None:
        seq = job.seq_id or 0
        if seq < self.next_seq or seq in self.jobs:
            raise InvalidRequest(
                f"seq_id {seq} of {self.run_id} was already used (next is {self.next_seq})"
            )
        self.jobs[seq] = job

    def head(self, gap_timeout_s: float, now: float | None = None) -> Job | None:
        """The next job in sequence, or None (nothing queued, or waiting for a missing seq_id)."""
        job = self.jobs.get(self.next_seq)
        if job is not None or not self.jobs:
            self.gap_since = None
            return job
        t = time.monotonic() if now is None else now
        if self.gap_since is None:
            self.gap_since = t
        if t - self.gap_since < gap_timeout_s:
            return None
        first = min(self.jobs)
        log.warning("%s: seq_ids %d..%d never arrived; skipping the gap",
                    self.run_id, self.next_seq, first - 1)
        self.next_seq, self.gap_since = first, None
        return self.jobs[first]

    def pop(self) -> Job:
        job = self.jobs.pop(self.next_seq)
        if job.then is not None:  # its second half is next, at the same seq_id
            self.jobs[self.next_seq], job.then = job.then, None
        else:
            self.next_seq += 1
        return job

    def wait_until(self, gap_timeout_s: float) -> float | None:
        """When a waiting gap times out (monotonic time), or None."""
        return None if self.gap_since is None else self.gap_since + gap_timeout_s


class SampleQueue:
    """Waiting sample jobs, fair across adapters. Thread-safe."""

    def __init__(self, max_jobs: int = 1024) -> None:
        self.max_jobs = max_jobs
        self._queues: OrderedDict[Hashable | None, deque[Job]] = OrderedDict()
        self._jobs = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._jobs

    def put(self, job: Job, front: bool = False) -> None:
        """Queue a job; `front` puts it first in its adapter's FIFO (a requeue), unbounded."""
        with self._lock:
            if not front and self._jobs >= self.max_jobs:
                raise NoCapacity(f"the sampler queue is full ({self.max_jobs} requests waiting)", 1.0)
            q = self._queues.setdefault(job.payload.key, deque())  # type: ignore[union-attr]
            q.appendleft(job) if front else q.append(job)
            self._jobs += 1

    def pop(self, running: Callable[[Hashable | None], int],
            fits: Callable[[Job], bool]) -> Job | None:
        """The next job to admit: least-served adapter first, then the oldest head job.

        `running(key)` counts the rows of an adapter decoding now; `fits(job)` says whether
        the job fits the engine's budgets. Only the chosen adapter's head is considered
        (no overtaking: a big job is not starved by small ones behind it).
        """
        with self._lock:
            if not self._queues:
                return None
            key = min(self._queues, key=lambda k: (running(k), self._queues[k][0].submitted))
            q = self._queues[key]
            if not fits(q[0]):
                return None
            job = q.popleft()
            if not q:
                del self._queues[key]
            self._jobs -= 1
            return job

    def drain(self) -> list[Job]:
        with self._lock:
            jobs = [j for q in self._queues.values() for j in q]
            self._queues.clear()
            self._jobs = 0
        return jobs
