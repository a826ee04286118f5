"""ServingQueue: admitted sampling jobs waiting for the engine, with per-adapter fairness.

Each adapter (revision key; None = the base) has its own FIFO. A batch is assembled round
robin over the adapters whose head job waited longest, taking at most
`max_rows_per_adapter` rows of any one adapter and `max_rows` rows in all, and at most
`max_adapters` distinct adapters (the engine's free slots). So one hot adapter fills its share
of every batch but never starves the others. The queue is bounded: a full queue answers
NoCapacity (HTTP 429 + Retry-After).

A job's future belongs to its client, who may cancel it at any time (a stream closed early
cancels it through `asyncio.wrap_future`): `take` drops cancelled jobs, and the engine thread
resolves futures only through `resolve`/`reject`, which ignore a future that is already done.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from lorafleet.engine.types import SampleRequest
from lorafleet.errors import NoCapacity

TokenCallback = Callable[[int, int, int, float], None]


def resolve(future: Future, value: object) -> None:
    """Set a job's result unless its client cancelled it (or it was failed) meanwhile."""
    try:
        future.set_result(value)
    except InvalidStateError:
        pass


def reject(future: Future, exc: BaseException) -> None:
    """Fail a job unless it is already done (cancelled by its client, answered, or failed)."""
    try:
        future.set_exception(exc)
    except InvalidStateError:
        pass


@dataclass(slots=True)
class ServeJob:
    """One API request: its prompts (adapter field unused), the revision key, where to answer."""

    key: Hashable | None
    requests: list[SampleRequest]
    on_token: TokenCallback | None = None
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return sum(r.num_samples for r in self.requests)


class ServingQueue:
    def __init__(self, *, max_rows: int = 64, max_rows_per_adapter: int = 16, max_jobs: int = 1024) -> None:
        self.max_rows = max_rows
        self.max_rows_per_adapter = max_rows_per_adapter
        self.max_jobs = max_jobs
        self._queues: OrderedDict[Hashable | None, deque[ServeJob]] = OrderedDict()
        self._jobs = 0
        self._closed: str | None = None  # why new jobs are refused, once closed
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._jobs

    @property
    def closed(self) -> str | None:
        """Why new jobs are refused (NoCapacity) once `close`d; None while open."""
        return self._closed

    def put(self, job: ServeJob) -> None:
        with self._lock:
            if self._closed is not None:
                raise NoCapacity(self._closed)
            if self._jobs >= self.max_jobs:
                raise NoCapacity(f"the serving queue is full ({self.max_jobs} requests waiting)", 1.0)
            self._queues.setdefault(job.key, deque()).append(job)
            self._jobs += 1

    def take(self, max_adapters: int, ready: Callable[[Hashable | None], bool] = lambda _: True) -> list[ServeJob]:
        """The next batch: fair across adapters, only adapters for which `ready(key)` holds.

        Jobs cancelled by their clients are dropped on the way."""
        with self._lock:
            self._drop_cancelled()
            order = sorted(
                (k for k, q in self._queues.items() if q and ready(k)),
                key=lambda k: self._queues[k][0].submitted,
            )
            batch: list[ServeJob] = []
            rows = 0
            adapters = 0
            for key in order:
                if rows >= self.max_rows:
                    break
                if key is not None:
                    if adapters >= max_adapters:
                        continue
                    adapters += 1
                q = self._queues[key]
                taken = 0
                while q and (taken == 0 or taken + q[0].rows <= self.max_rows_per_adapter):
                    if batch and rows + q[0].rows > self.max_rows:
                        break
                    job = q.popleft()
                    batch.append(job)
                    taken += job.rows
                    rows += job.rows
                if not q:
                    del self._queues[key]
            self._jobs -= len(batch)
            return batch

    def _drop_cancelled(self) -> None:
        for key in list(self._queues):
            q = self._queues[key]
            live = deque(j for j in q if not j.future.done())
            self._jobs -= len(q) - len(live)
            if live:
                self._queues[key] = live
            else:
                del self._queues[key]

    def close(self, reason: str) -> None:
        """Fail every queued job, and refuse new ones from now on, with NoCapacity(reason)."""
        with self._lock:
            self._closed = reason
            jobs = [j for q in self._queues.values() for j in q]
            self._queues.clear()
            self._jobs = 0
        for j in jobs:
            reject(j.future, NoCapacity(reason))
