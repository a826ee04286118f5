"""The control plane's side of one engine actor: it sends jobs, delivers their events to the
jobs' sinks, and fails them all at once when the actor dies.

Two threads per engine:
- the sender sends queued `WireJob`s in batches, one batch in flight at a time (so the actor
  receives them in submission order: a create before the run's first forward_backward);
- the poller long-polls the actor for a `Report` (sink events and the engine's state), hands
  tokens to `sink.on_token` at once and `done` / `failed` to an I/O worker (a Tinker sink
  writes checkpoints and databases there, as in-process).
A failed call means the actor died (or its node did): every job sent to it and not answered
fails at once (`on_lost` says with what: a retryable `Unavailable` for sampling, a `RunLost`
naming the last checkpoint for a training run), the engine counts as dead, and the poller
keeps calling until Ray has restarted the actor (a new incarnation: empty, its base reloaded
from its node's disk), which makes it live again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from lorafleet.engine.jobs import Job, WorkKind
from lorafleet.engine.scheduler import IOWorker
from lorafleet.errors import Unavailable
from lorafleet.fleet.messages import DONE, FAILED, TOKENS, EngineState, Report, WireJob

log = logging.getLogger(__name__)

POLL_WAIT_S = 0.25  # how long one poll waits in the actor for events
CALL_TIMEOUT_S = 120.0  # a submit or poll that takes longer: the actor is hung, treat it as dead


@dataclass(slots=True)
class _Sent:
    job: Job
    wire: WireJob
    cancel_sent: bool = False


class EngineHandle:
    """One engine actor of one base, seen from the control plane.

    Args:
        engine_id: stable across restarts ('<base>#<index>'); the routing hash uses it.
        actor: the Ray actor handle (fleet/worker.py `EngineWorker` under `ray.remote`).
        on_lost: called with (handle, job) for each job that was out when the actor died;
            returns the error that job fails with.
        on_death: called with the handle once per death (before any `on_lost`).
        on_done: called with (job, result) before a DONE reaches its sink (placement
            bookkeeping: checkpoints of runs).
    """

    def __init__(self, engine_id: str, base: str, actor: Any,
                 on_lost: Callable[[EngineHandle, Job], Exception] = lambda h, job: Unavailable(f"engine {h.id} died"),
                 on_done: Callable[[Job, Any], None] = lambda job, result: None,
                 on_death: Callable[[EngineHandle], None] = lambda handle: None) -> None:
        self.id = engine_id
        self.base = base
        self.actor = actor
        self.on_lost = on_lost
        self.on_done = on_done
        self.on_death = on_death
        self.alive = False
        self.state: EngineState | None = None
        self.lost_count = 0  # deaths seen
        self.last_lost_at: float | None = None
        self._lock = threading.Lock()
        self._out: dict[int, _Sent] = {}  # sent (or queued to send) and not answered
        self._routed: set[Hashable] = set()  # adapter keys sent here since the last report
        self._sendq: queue.SimpleQueue[WireJob | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self.io = IOWorker(f"fleet-io-{engine_id}")
        self._threads = [threading.Thread(target=self._send_loop, name=f"fleet-send-{engine_id}", daemon=True),
                         threading.Thread(target=self._poll_loop, name=f"fleet-poll-{engine_id}", daemon=True)]

    # ---- lifecycle ----------------------------------------------------------------------------

    def wait_ready(self, timeout_s: float) -> None:
        import ray

        self._adopt(ray.get(self.actor.ready.remote(), timeout=timeout_s))

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self._sendq.put(None)
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=5)
        self.io.close()

    # ---- any thread ---------------------------------------------------------------------------

    @property
    def load(self) -> int:
        with self._lock:
            return len(self._out)

    def sample_load(self) -> int:
        with self._lock:
            return sum(1 for s in self._out.values() if s.wire.kind is WorkKind.SAMPLE)

    def resident(self, key: Hashable) -> bool:
        state = self.state
        with self._lock:
            if key in self._routed:
                return True
        return state is not None and (key in state.slots or key in state.host)

    def has_host(self, key: Hashable) -> bool:
        state = self.state
        return state is not None and key in state.host

    def send(self, job: Job, wire: WireJob) -> None:
        with self._lock:
            self._out[wire.id] = _Sent(job, wire)
            if wire.key is not None:
                self._routed.add(wire.key)
        self._sendq.put(wire)

    def cancel_all(self, error: Exception) -> None:
        """Fail every job out there now with `error` (shutdown); the actor drops them too."""
        with self._lock:
            out = list(self._out.values())
        for s in out:
            s.job.cancel()
            self._finish(s.wire.id, error)

    def describe(self) -> dict[str, Any]:
        s = self.state
        return {"id": self.id, "base": self.base, "pid": s.pid if s else None,
                "node": s.node if s else None, "alive": self.alive,
                "queue_depth": max(self.load, s.queue_depth if s else 0),
                "resident": sorted(map(str, s.slots)) if s else [],
                "host": len(s.host) if s else 0, "restarts": self.lost_count,
                "sample_hits": s.stats.get("sample_hits", 0) if s else 0,
                "sample_misses": s.stats.get("sample_misses", 0) if s else 0}

    # ---- the sender ---------------------------------------------------------------------------

    def _send_loop(self) -> None:
        import ray

        while True:
            first = self._sendq.get()
            if first is None:
                return
            batch = [first]
            while True:
                try:
                    nxt = self._sendq.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._stop.set()
                    break
                batch.append(nxt)
            with self._lock:  # answered (failed by a loss) before they left: not sent
                batch = [w for w in batch if w.id in self._out]
            if not batch:
                continue
            try:
                ray.get(self.actor.submit.remote(batch), timeout=CALL_TIMEOUT_S)
            except Exception as e:  # the actor died: its poller fails the rest
                log.warning("engine %s refused a batch (%s: %s)", self.id, type(e).__name__, e)
                self._lost(ids=[w.id for w in batch])
            if self._stop.is_set():
                return

    # ---- the poller ---------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        import ray

        while not self._stop.is_set():
            with self._lock:
                cancels = [i for i, s in self._out.items() if s.job.cancelled and not s.cancel_sent]
                for i in cancels:
                    self._out[i].cancel_sent = True
            try:
                report: Report = ray.get(self.actor.poll.options(concurrency_group="poll").remote(cancels, POLL_WAIT_S),
                                         timeout=CALL_TIMEOUT_S)
            except Exception as e:
                if self._stop.is_set():
                    return
                if self.alive:
                    log.warning("engine %s is lost (%s: %s); failing its work", self.id, type(e).__name__, e)
                self._lost()
                time.sleep(0.2)
                continue
            self._adopt(report.state)
            for event in report.events:
                if event.what == TOKENS:
                    self._tokens(event.job, event.data)
                else:
                    self._finish(event.job, event.data if event.what == FAILED else None,
                                 event.data if event.what == DONE else None)

    def _adopt(self, state: EngineState) -> None:
        """A report arrived: a new incarnation means the actor restarted since the last one."""
        if self.state is not None and state.incarnation != self.state.incarnation:
            log.warning("engine %s restarted (pid %s -> %s)", self.id, self.state.pid, state.pid)
            self._lost()
        with self._lock:
            self.state = state
            self._routed.clear()
        if not self.alive:
            log.info("engine %s is live (pid %d on %s)", self.id, state.pid, state.node)
        self.alive = True

    def _lost(self, ids: list[int] | None = None) -> None:
        """The actor died: fail what was out there (all of it, or `ids`), once per death."""
        with self._lock:
            was_alive = self.alive
            self.alive = False
            self._routed.clear()
            if ids is None:
                ids = list(self._out)
            out = [self._out[i] for i in ids if i in self._out]
        if was_alive:
            self.lost_count += 1
            self.last_lost_at = time.monotonic()
            self.on_death(self)
        for s in out:
            self._finish(s.wire.id, self.on_lost(self, s.job))

    def _tokens(self, job_id: int, tokens: list[tuple[int, int, int, float]]) -> None:
        with self._lock:
            s = self._out.get(job_id)
        if s is None or s.job.cancelled:
            return
        try:
            for request, sample, token, logprob, top in tokens:
                s.job.sink.on_token(s.job, request, sample, token, logprob, top)
        except Exception:
            log.exception("on_token failed; cancelling the job")
            s.job.cancel()

    def _finish(self, job_id: int, error: Exception | None, result: Any = None) -> None:
        """A job's outcome, to its sink on the I/O worker, exactly once."""
        with self._lock:
            s = self._out.pop(job_id, None)
        if s is None or not s.job.answer():
            return
        job = s.job
        lease = getattr(job.payload, "lease", None)
        if lease is not None:
            lease.release()

        def deliver() -> None:
            try:
                if error is not None:
                    job.sink.failed(job, error)
                else:
                    self.on_done(job, result)
                    job.sink.done(job, result)
            except Exception as e:
                log.exception("sink of %s failed", job.kind)
                if error is None:
                    try:
                        job.sink.failed(job, e)
                    except Exception:
                        log.exception("sink.failed of %s failed", job.kind)

        self.io.call(deliver)
