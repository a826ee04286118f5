"""The engines of one base behind one scheduler-shaped object: what the services call
`runner` (`.base`, `.submit(job)`, `.knows_run`, `.residency`, `.health`, `.drain`, `.stop`).

The control plane keeps the services' code path of the in-process engine: a service builds a
typed `Job` with its sink and calls `submit`; `Fleet.submit` places it (fleet/routing.py) on one
`EngineHandle` (fleet/handle.py) and sends it as a `WireJob`. Per engine: its own residency
tiers and cold loader, in the actor. The control plane's `FleetResidency` only keeps adapter
versions that exist nowhere else (Tinker sampler weights fresh from training, or read back from
a checkpoint folder), and ships them with a job to an engine that lacks them.

Failover: an engine that dies fails its jobs at once (its handle calls `_lost_error`): sampling
with `Unavailable` (503 + Retry-After, retryable: the next request is routed to a live engine and
its adapter reloads there from the store), training runs with `RunLost` naming the run's last
checkpoint (its weights and optimizer state were in the dead process; `load_state` resumes it on
a live engine). Later calls on a lost run get the same error.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

from lorafleet.engine.jobs import BARRIERS, Job, Sample, Save, Snapshot, WorkKind
from lorafleet.engine.lru import PinnedLRU
from lorafleet.errors import NoCapacity, NotFound, RunLost, Unavailable
from lorafleet.fleet import routing
from lorafleet.fleet.handle import EngineHandle
from lorafleet.fleet.messages import WireJob

log = logging.getLogger(__name__)
_ids = itertools.count(1)


class FleetLease:
    """The control plane's lease of a sample job: a hold on a stashed adapter version, if any.
    `loaded` is resolved at once: the engine the job goes to loads what it lacks itself."""

    def __init__(self, residency: FleetResidency, key: Hashable) -> None:
        self.residency = residency
        self.key = key
        self.loaded: Future = Future()
        self.loaded.set_result(None)
        self._released = False

    def activate(self) -> int:  # never called in the control plane (the engine has its own)
        raise RuntimeError("a fleet lease is activated in its engine")

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.residency.release(self.key)


class FleetResidency:
    """The control plane's view of where adapters are, across the engines of one base.

    Keeps the adapter versions only the control plane has (`add_host`, or `acquire(key, load)`)
    in a small LRU, held while a job needs them; everything else (catalog revisions) the
    engines load from the shared store themselves.
    """

    def __init__(self, fleet: Fleet, max_host_adapters: int | None = 512) -> None:
        self.fleet = fleet
        self.metrics = fleet.metrics
        self._lock = threading.RLock()
        self._host: PinnedLRU[Hashable, Any] = PinnedLRU(max_entries=max_host_adapters)
        self._pins: dict[Hashable, int] = {}
        self.loader = _NoLoader()

    def acquire(self, key: Hashable, load: Callable[[], Any] | None = None) -> FleetLease:
        if load is not None and not self.has_host(key) and not any(h.has_host(key) for h in self.fleet.live()):
            self.add_host(key, load())
        with self._lock:
            if key in self._host:
                self._host.pin(key)
        return FleetLease(self, key)

    def release(self, key: Hashable) -> None:
        with self._lock:
            if key in self._host and self._host.is_pinned(key):
                self._host.unpin(key)

    def add_host(self, key: Hashable, weights: Any) -> None:
        with self._lock:
            self._host.put(key, weights)

    def weights(self, key: Hashable) -> Any:
        with self._lock:
            return self._host.get(key) if key in self._host else None

    def has_host(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._host

    def pin(self, key: Hashable) -> None:
        """Pin in the engine the key routes to (and keep routing it there while it is resident)."""
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1
        self.fleet.call_routed(key, "pin")

    def unpin(self, key: Hashable) -> None:
        with self._lock:
            if self._pins.get(key, 0) <= 0:
                return
            self._pins[key] -= 1
            if not self._pins[key]:
                del self._pins[key]
        for h in self.fleet.live():
            if h.resident(key):
                h.actor.unpin.remote(key)

    def is_pinned(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._pins

    def tier(self, key: Hashable) -> str:
        states = [h.state for h in self.fleet.live() if h.state is not None]
        if any(key in s.slots for s in states):
            return "slot"
        if any(key in s.host for s in states) or self.has_host(key):
            return "host"
        return "store"

    def counts(self) -> dict[str, int]:
        states = [h.state for h in self.fleet.live() if h.state is not None]
        return {"slot": sum(len(s.slots) for s in states), "host": sum(len(s.host) for s in states)}

    @property
    def max_slots(self) -> int:
        return self.fleet.max_slots * len(self.fleet.handles)

    def free_slots_for_batch(self) -> int:
        return self.max_slots

    def close(self) -> None:
        pass


class _NoLoader:
    depth = 0  # cold loads run in the engines; their queues are in /admin/v1/engines


class Fleet:
    """The engine actors of one base.

    Args:
        base: the base model (its tokenizer and info are what the services read; its weights
            stay in each engine's own process).
        handles: one per engine actor.
        spill_depth: a sample goes to the least loaded engine instead of its adapter's home
            engine when the home has more jobs out than this, or more than the least loaded
            engine's by over `routing.SPILL_SLACK`.
        max_sample_queue: sample jobs out per engine at most (more: NoCapacity, 429).
    """

    def __init__(self, base: Any, handles: list[EngineHandle], metrics: Any, *, spill_depth: int = 32,
                 max_sample_queue: int = 512, max_slots: int = 64,
                 on_stop: Callable[[], None] = lambda: None) -> None:
        self.base = base
        self.handles = handles
        self.metrics = metrics
        self.spill_depth = spill_depth
        self.max_sample_queue = max_sample_queue
        self.max_slots = max_slots
        self.residency = FleetResidency(self)
        self._on_stop = on_stop
        self._lock = threading.Lock()
        self._placed: dict[str, EngineHandle] = {}  # run id -> the engine it lives in
        self._lost: dict[str, str] = {}  # run id -> why it is gone (names its checkpoint)
        self._checkpoint: dict[str, str] = {}  # run id -> its last checkpoint path
        self._closed: str | None = None
        self.routed = {k: 0 for k in (routing.RESIDENT, routing.HASHED, routing.SPILLED, routing.LEAST_LOADED)}
        for h in handles:
            h.on_lost = self._lost_error
            h.on_done = self._observe
            h.on_death = self._engine_died
        if metrics is not None:
            from lorafleet.metrics import add_engines

            add_engines(metrics, self)

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        for h in self.handles:
            h.start()

    @property
    def alive(self) -> bool:
        return any(h.alive for h in self.handles)

    def drain(self, reason: str = "the server is shutting down") -> None:
        self._closed = reason
        for h in self.handles:
            with h._lock:
                samples = [s for s in h._out.values() if s.wire.kind is WorkKind.SAMPLE]
            for s in samples:
                s.job.cancel()
                h._finish(s.wire.id, NoCapacity(reason))

    def stop(self) -> None:
        self.drain()
        for h in self.handles:
            h.cancel_all(NoCapacity("the server is shutting down"))
            h.stop()
        self._on_stop()

    def health(self, stall_s: float) -> dict[str, Any]:
        live = sum(1 for h in self.handles if h.alive)
        return {"ok": live > 0, "alive": live > 0, "engines": len(self.handles), "live_engines": live,
                "pending": any(h.load for h in self.handles)}

    # ---- what the services call ---------------------------------------------------------------

    def live(self) -> list[EngineHandle]:
        return [h for h in self.handles if h.alive]

    @property
    def runs(self) -> dict[str, str]:
        with self._lock:
            return {run: h.id for run, h in self._placed.items()}

    @property
    def stats(self) -> dict[str, int]:
        out: dict[str, int] = dict(self.routed)
        for h in self.handles:
            for k, v in (h.state.stats if h.state else {}).items():
                out[k] = out.get(k, 0) + v
        return out

    def knows_run(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._placed or run_id in self._lost

    def submit(self, job: Job) -> None:
        if job.kind is WorkKind.SAMPLE:
            self._submit_sample(job)
        elif job.kind in (WorkKind.CREATE_RUN, WorkKind.LOAD_RUN):
            self._place_run(job)
        elif job.kind is WorkKind.UNLOAD_RUN:
            self._unload(job)
        else:
            self._send(self._home_of(job.run_id or ""), job)

    def engines(self) -> list[dict[str, Any]]:
        """One record per engine, for GET /admin/v1/engines."""
        runs = self.runs
        return [h.describe() | {"runs": sorted(r for r, e in runs.items() if e == h.id)} for h in self.handles]

    def call_routed(self, key: Hashable, method: str) -> None:
        live = self.live()
        if live:
            h, _ = routing.route_sample(key, self._candidates(live, key), self.spill_depth)
            getattr(self._handle(h.id).actor, method).remote(key)

    # ---- placement ----------------------------------------------------------------------------

    def _live_or_fail(self) -> list[EngineHandle]:
        live = self.live()
        if not live:
            raise Unavailable(f"no engine of {self.base.name} is live (restarting); retry shortly", 2.0)
        return live

    def _candidates(self, live: list[EngineHandle], key: Hashable | None = None) -> list[routing.Candidate]:
        runs: dict[str, int] = {}
        with self._lock:
            for h in self._placed.values():
                runs[h.id] = runs.get(h.id, 0) + 1
        return [routing.Candidate(h.id, h.load, runs.get(h.id, 0), key is not None and h.resident(key))
                for h in live]

    def _handle(self, engine_id: str) -> EngineHandle:
        return next(h for h in self.handles if h.id == engine_id)

    def _place_run(self, job: Job) -> None:
        """Create and load jobs are never refused at submit (the services record their future
        first): with no live engine the job fails through its sink, retryably."""
        try:
            live = self._live_or_fail()
        except Unavailable as e:
            if job.answer():
                job.sink.failed(job, e)
            return
        h = self._handle(routing.place_run(self._candidates(live)).id)
        with self._lock:
            self._placed[job.run_id or ""] = h
            self._lost.pop(job.run_id or "", None)
            if job.kind is WorkKind.LOAD_RUN and job.payload.parent:  # type: ignore[union-attr]
                self._checkpoint[job.run_id or ""] = job.payload.parent  # type: ignore[union-attr]
        log.info("training run %s placed on engine %s", job.run_id, h.id)
        self._send(h, job)

    def _home_of(self, run_id: str) -> EngineHandle:
        with self._lock:
            lost = self._lost.get(run_id)
            h = self._placed.get(run_id)
        if lost is not None:
            raise RunLost(lost)
        if h is None:
            raise NotFound(f"training run {run_id} is not loaded")
        return h

    def _unload(self, job: Job) -> None:
        run_id = job.run_id or ""
        with self._lock:
            h = self._placed.pop(run_id, None)
            self._lost.pop(run_id, None)
            self._checkpoint.pop(run_id, None)
        if h is not None and h.alive:
            self._send(h, job)
        elif job.answer():
            job.sink.done(job, None)

    def _submit_sample(self, job: Job) -> None:
        if self._closed is not None:
            raise NoCapacity(self._closed)
        live = self._live_or_fail()
        key = job.payload.key  # type: ignore[union-attr]
        c, why = routing.route_sample(key, self._candidates(live, key), self.spill_depth)
        h = self._handle(c.id)
        if h.sample_load() >= self.max_sample_queue:
            raise NoCapacity(f"the sample queues of {self.base.name} are full ({self.max_sample_queue} jobs)")
        self.routed[why] += 1
        weights = None
        if key is not None and not h.has_host(key):
            weights = self.residency.weights(key)  # None: a catalog revision, the engine loads it
        self._send(h, job, key=key, weights=weights)

    def _send(self, h: EngineHandle, job: Job, key: Hashable | None = None, weights: Any = None) -> None:
        if not h.alive:
            raise self._lost_error(h, job)
        payload = job.payload
        if job.kind is WorkKind.SAMPLE:
            payload = Sample(payload.requests, None)  # type: ignore[union-attr]
        wire = WireJob(next(_ids), job.kind, payload, job.run_id, job.seq_id, job.tenant, key, weights)
        h.send(job, wire)

    # ---- failover -----------------------------------------------------------------------------

    def _observe(self, job: Job, result: Any) -> None:
        """Results on their way to the sinks: remember each run's last training checkpoint."""
        p = job.payload
        if job.kind in BARRIERS and isinstance(p, Save) and isinstance(result, Snapshot):
            if p.parent and p.with_optimizer:  # a training checkpoint (weights and Adam state)
                with self._lock:
                    self._checkpoint[job.run_id or ""] = p.parent

    def _engine_died(self, h: EngineHandle) -> None:
        """The runs that lived in `h` are lost (their calls now name their last checkpoint)."""
        with self._lock:
            for run_id, home in list(self._placed.items()):
                if home is h:
                    del self._placed[run_id]
                    self._lost[run_id] = self._lost_message(run_id, h)
                    log.warning("%s", self._lost[run_id])

    def _lost_error(self, h: EngineHandle, job: Job) -> Exception:
        """The error a job out on the dead engine `h` fails with."""
        self._engine_died(h)  # a no-op after the first call of a death
        with self._lock:
            lost = self._lost.get(job.run_id or "") if job.kind is not WorkKind.SAMPLE else None
        if lost is not None:
            return RunLost(lost)
        return Unavailable(f"engine {h.id} of {self.base.name} died while running this request; "
                           "retry: it goes to a live engine", 1.0)

    def _lost_message(self, run_id: str, h: EngineHandle) -> str:
        ckpt = self._checkpoint.get(run_id)
        where = (f"its last checkpoint is {ckpt}: resume from it with load_state "
                 "(create_training_client_from_state)") if ckpt else "it has no checkpoint: create it again"
        return f"training run {run_id} was lost: its engine {h.id} died; {where}"
