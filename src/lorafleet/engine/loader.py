"""ColdLoader: cold adapter loads as scheduled work.

A miss becomes a queued key. Identical concurrent misses share one load (one future per key);
distinct misses queued together are fetched as one batch; the queue is bounded and a full
queue refuses new misses with NoCapacity (HTTP 429 + Retry-After, retryable) instead of
hanging. Workers are plain threads doing I/O and parsing only: no engine work here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

from lorafleet.errors import NoCapacity
from lorafleet.metrics import Metrics

log = logging.getLogger(__name__)

FetchMany = Callable[[list[Any]], dict[Any, Any]]  # keys -> {key: value or Exception}


class ColdLoader:
    """Bounded, coalescing, batching loader of adapter weights.

    Args:
        fetch_many: loads a batch of keys; returns a value or an Exception per key.
        on_loaded: called (in the worker) with (key, value) before the key's future resolves.
        max_queue: keys waiting or loading at most; more misses get NoCapacity.
        batch_size: keys fetched per batch.
        workers: loader threads.
    """

    def __init__(
        self,
        fetch_many: FetchMany,
        on_loaded: Callable[[Hashable, Any], None],
        *,
        max_queue: int = 64,
        batch_size: int = 8,
        workers: int = 1,
        retry_after_s: float = 1.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._fetch_many = fetch_many
        self._on_loaded = on_loaded
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self._cv = threading.Condition()
        self._queued: OrderedDict[Hashable, Future] = OrderedDict()
        self._loading: dict[Hashable, Future] = {}
        self._closed = False
        self.batches = 0  # fetch_many calls, for tests and benchmarks
        self.loads = 0  # keys fetched
        self._threads = [threading.Thread(target=self._work, name=f"cold-loader-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def request(self, key: Hashable) -> Future:
        """The future of `key`'s load, shared with any identical miss already queued."""
        with self._cv:
            if self._closed:
                raise NoCapacity("the loader is shutting down", self.retry_after_s)
            fut = self._queued.get(key) or self._loading.get(key)
            if fut is not None:
                return fut
            if len(self._queued) + len(self._loading) >= self.max_queue:
                if self.metrics:
                    self.metrics.load_rejections.inc()
                raise NoCapacity(
                    f"cold-load queue is full ({self.max_queue} adapters loading); retry shortly",
                    self.retry_after_s,
                )
            fut = Future()
            self._queued[key] = fut
            self._set_depth()
            self._cv.notify()
            return fut

    @property
    def depth(self) -> int:
        with self._cv:
            return len(self._queued) + len(self._loading)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=5)

    def _set_depth(self) -> None:
        if self.metrics:
            self.metrics.load_queue_depth.set(len(self._queued) + len(self._loading))

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queued and not self._closed:
                    self._cv.wait()
                if self._closed and not self._queued:
                    return
                batch: dict[Hashable, Future] = {}
                while self._queued and len(batch) < self.batch_size:
                    key, fut = self._queued.popitem(last=False)
                    batch[key] = fut
                self._loading.update(batch)
            self._load(batch)

    def _load(self, batch: dict[Hashable, Future]) -> None:
        t0 = time.perf_counter()
        try:
            results = self._fetch_many(list(batch))
        except Exception as e:  # the whole batch failed (e.g. the store is down)
            results = {k: e for k in batch}
        for key, fut in batch.items():
            value = results.get(key, LookupError(f"{key!r} was not returned by the store"))
            if not isinstance(value, Exception):
                try:
                    self._on_loaded(key, value)
                except Exception as e:
                    value = e
            with self._cv:
                self._loading.pop(key, None)
                self._set_depth()
            if isinstance(value, Exception):
                log.warning("cold load of %s failed: %s", key, value)
                fut.set_exception(value)
            else:
                fut.set_result(value)
        self.batches += 1
        self.loads += len(batch)
        if self.metrics:
            self.metrics.loads.inc(len(batch))
            self.metrics.load_seconds.observe(time.perf_counter() - t0)
