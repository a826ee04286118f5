"""The engine side of a Ray engine actor: one base, one `Engine`, one `Scheduler`, its own
residency (slots, host cache, cold loader from the shared store), in the actor's process.

`EngineWorker` is a plain class (fleet/runtime.py wraps it with `ray.remote`): the control
plane calls `submit` with `WireJob`s (in order: one batch in flight at a time) and `poll` in a
loop (its own concurrency group, so a poll waiting for events never holds up a submit). Sink
calls become `Event`s in an outbox that `poll` drains: tokens are batched per job, so a decode
step of 64 rows is one message, not 64.

Why polling and not a Ray streaming generator per job: one long-poll per engine carries the
events of every job, so the number of Ray calls does not grow with the number of requests, and
the death of the actor surfaces as one exception in one place (the control plane's poller),
which fails every job still out there at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.engine.jobs import Job, Sample, WorkKind
from lorafleet.engine.types import SampleRequest, TopLogprobs
from lorafleet.errors import LorafleetError
from lorafleet.fleet.messages import DONE, FAILED, TOKENS, EngineState, Event, Report, WireJob

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything an engine actor needs to build its engine (picklable, small)."""

    base: str
    home: str
    database_url: str | None  # the catalog the cold loader reads adapters from; None: no catalog
    store_url: str | None
    dtype: str = "float32"
    device: str = "cpu"
    cpu_prepack: bool = True
    threads: int = 1
    gap_timeout_s: float = 30.0
    max_sample_queue: int = 512
    micro_batch_tokens: int = 1024
    max_slots: int = 64
    max_host_adapters: int | None = 512
    max_host_bytes: int | None = None
    load_queue: int = 64
    load_batch: int = 8
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    kv_cache_bytes: int = 2 << 30


class _Outbox:
    """Sink events waiting for the next poll; consecutive tokens of a job are merged."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._events: list[Event] = []

    def put(self, event: Event) -> None:
        with self._cv:
            last = self._events[-1] if self._events else None
            if event.what == TOKENS and last is not None and last.what == TOKENS and last.job == event.job:
                last.data.extend(event.data)
            else:
                self._events.append(event)
            self._cv.notify_all()

    def take(self, wait_s: float) -> list[Event]:
        with self._cv:
            if not self._events:
                self._cv.wait(timeout=wait_s)
            out, self._events = self._events, []
            return out


class _ActorSink:
    """The sink of every job in the actor: its outcome goes to the outbox."""

    def __init__(self, outbox: _Outbox) -> None:
        self.outbox = outbox

    def done(self, job: Job, result: Any) -> None:
        self.outbox.put(Event(job.tag, DONE, result))

    def failed(self, job: Job, error: Exception) -> None:
        self.outbox.put(Event(job.tag, FAILED, portable(error)))

    def on_token(self, job: Job, request: int, sample: int, token: int, logprob: float,
                 top: TopLogprobs | None) -> None:
        self.outbox.put(Event(job.tag, TOKENS, [(request, sample, token, logprob, top)]))


def portable(error: BaseException) -> Exception:
    """An exception that unpickles in the control plane: lorafleet errors as they are, anything
    else as a RuntimeError carrying its text (logged here with its traceback)."""
    if isinstance(error, LorafleetError):
        return error
    log.error("engine error: %s", "".join(traceback.format_exception(error)))
    return RuntimeError(f"{type(error).__name__}: {error}")


class EngineWorker:
    def __init__(self, cfg: WorkerConfig) -> None:
        import torch

        from lorafleet.config import Paths
        from lorafleet.engine import Engine
        from lorafleet.engine.decode import Budgets
        from lorafleet.engine.grammar import GrammarCompiler
        from lorafleet.engine.scheduler import Scheduler
        from lorafleet.metrics import Metrics
        from lorafleet.model import load_base

        torch.set_num_threads(max(1, cfg.threads))
        self.cfg = cfg
        self.started = time.time()
        paths = Paths(home=Path(cfg.home), database_url=cfg.database_url or "", store_url=cfg.store_url or "")
        self.base = load_base(cfg.base, paths, dtype=cfg.dtype, device=cfg.device)
        engine = Engine(self.base, cpu_prepack=cfg.cpu_prepack)
        self.catalog = None
        if cfg.database_url:
            from lorafleet.catalog.service import Catalog

            self.catalog = Catalog.open(cfg.database_url, cfg.store_url or "", migrate=False)
        residency = self._residency(engine, Metrics())
        budgets = Budgets(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                          kv_cache_bytes=cfg.kv_cache_bytes)
        self.scheduler = Scheduler(engine, self.base, residency=residency, budgets=budgets,
                                   gap_timeout_s=cfg.gap_timeout_s, max_sample_queue=cfg.max_sample_queue,
                                   micro_batch_tokens=cfg.micro_batch_tokens, metrics=residency.metrics)
        self.grammars = GrammarCompiler(self.base.tokenizer, self.base.info.vocab_size)
        self.outbox = _Outbox()
        self.sink = _ActorSink(self.outbox)
        self._jobs: dict[int, Job] = {}  # unanswered jobs, for cancels
        self._lock = threading.Lock()
        self.routing = {"sample_hits": 0, "sample_misses": 0}
        self.scheduler.start()

    def _residency(self, engine: Any, metrics: Any) -> Any:
        from lorafleet.engine.residency import Residency

        catalog = self.catalog

        def fetch_many(keys: list[Any]) -> dict[Any, Any]:
            from lorafleet.catalog.records import ADMIN
            from lorafleet.errors import NoCapacity, NotFound
            from lorafleet.lora import io as lora_io

            out: dict[Any, Any] = {}
            for key in keys:
                try:
                    if catalog is None:
                        raise NotFound(f"{key} is not in this engine's memory and it has no catalog")
                    out[key] = lora_io.parse_peft_files(catalog.read_files(ADMIN, key)).weights
                except NotFound:  # a sampler version only the control plane holds: send it again
                    out[key] = NoCapacity(f"adapter {key} left the memory of this engine; retry")
                except Exception as e:
                    out[key] = e
            return out

        c = self.cfg
        return Residency(engine, fetch_many, max_slots=c.max_slots, max_host_adapters=c.max_host_adapters,
                         max_host_bytes=c.max_host_bytes, max_queue=c.load_queue,
                         load_batch=c.load_batch, metrics=metrics)

    # ---- called by the control plane --------------------------------------------------------

    def ready(self) -> EngineState:
        return self.state()

    def submit(self, batch: list[WireJob]) -> None:
        """Queue jobs in order; a refusal becomes the job's FAILED event."""
        for w in batch:
            try:
                self._submit(w)
            except Exception as e:
                self._forget(w.id)
                self.outbox.put(Event(w.id, FAILED, portable(e)))

    def poll(self, cancel: list[int], wait_s: float) -> Report:
        """Cancel jobs whose clients left, then the events so far (waiting up to `wait_s`)."""
        with self._lock:
            jobs = [self._jobs.get(i) for i in cancel]
        for job in jobs:
            if job is not None:
                job.cancel()
        events = self.outbox.take(wait_s)
        with self._lock:
            for e in events:
                if e.what != TOKENS:
                    self._jobs.pop(e.job, None)
        return Report(events, self.state())

    def pin(self, key: Any) -> None:
        self.scheduler.residency.pin(key)

    def unpin(self, key: Any) -> None:
        self.scheduler.residency.unpin(key)

    def state(self) -> EngineState:
        s = self.scheduler
        slots, host = s.residency.keys()
        with s._cv:
            depth = len(s.samples) + len(s.decode.rows) + sum(len(r.queue.jobs) for r in s.training.runs.values())
            runs = sorted(s.training.runs)
        return EngineState(incarnation=f"{os.getpid()}@{self.started}", pid=os.getpid(),
                           node=socket.gethostname(), queue_depth=depth, slots=slots, host=host,
                           runs=runs, stats={**s.stats, **self.routing})

    # ---- internals --------------------------------------------------------------------------

    def _submit(self, w: WireJob) -> None:
        payload = Sample(self._compiled(w.payload.requests)) if w.kind is WorkKind.SAMPLE else w.payload
        job = Job(w.kind, payload, self.sink, run_id=w.run_id, seq_id=w.seq_id, tenant=w.tenant, tag=w.id)
        with self._lock:
            self._jobs[w.id] = job
        if w.kind is not WorkKind.SAMPLE or w.key is None:
            self.scheduler.submit(job)
            return
        res = self.scheduler.residency
        hit = res.has_host(w.key)
        self.routing["sample_hits" if hit else "sample_misses"] += 1
        lease = res.acquire(w.key, None if w.weights is None else (lambda: w.weights))
        job.payload = Sample(payload.requests, lease)

        def loaded(f: Any) -> None:  # the cold loader's thread, or here on a hit
            try:
                f.result()
                self.scheduler.submit(job)
            except Exception as e:
                lease.release()
                self._forget(w.id)
                self.outbox.put(Event(w.id, FAILED, portable(e)))

        lease.loaded.add_done_callback(loaded)

    def _compiled(self, requests: list[SampleRequest]) -> list[SampleRequest]:
        """The requests with their structured-output grammars compiled in this process (a
        grammar crosses as its spec; the control plane already validated it)."""
        out = []
        for r in requests:
            g = r.params.grammar
            if g is not None and not g.compiled:
                r = dataclasses.replace(r, params=dataclasses.replace(r.params, grammar=self.grammars.compile(g.spec)))
            out.append(r)
        return out

    def _forget(self, job_id: int) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)
