"""The engine's scheduler: two compute lanes per resident base (a training thread and a decode
thread over the same engine), an I/O worker, typed jobs in, results out through each job's sink.

The training lane, per iteration:
1. unordered jobs (create / load / unload a run), in arrival order;
2. the next micro-batch of the fused forward_backward batch in progress (or the start of a new
   one, or barrier jobs), see engine/training.py.
The decode lane, per iteration: one `DecodeBatch.step` (engine/decode.py): every running row
decodes one token, finished rows leave, and waiting sample jobs are admitted under the budgets
(chunked prefill), least-served adapter first (engine/queues.py `SampleQueue`).

Why two threads: a decode step is many small kernels and a training micro-batch a few large
ones; run one after the other on one thread, a decode row waits a whole micro-batch (seconds on
a CPU) between two tokens. On two threads both run at once (torch releases the GIL inside its
kernels), each with the configured torch thread count, so decoding keeps its inter-token
latency while training runs and training keeps its throughput while decoding runs. What they
share is safe to share: the base weights are frozen, each thread has its own LoRA operands
(`LoraRuntime` is thread-local, lora/layers.py) and grad mode (torch's is per thread), the
training lane alone touches runs and their trainable leaves, the decode lane alone the decode
batch and the adapter slots; the queues and residency are locked.

Results leave through the job's sink: `done` / `failed` on the I/O worker thread (which may
write files and databases: checkpoints, catalog publishes, futures), never on a compute lane;
`on_token` on the decode lane.

Guarantees:
- A lane never dies of a request. Each lane's iteration runs guarded: an unexpected exception
  fails that iteration's unanswered jobs (a server error, logged), and the loop goes on. Sink
  calls are guarded too.
- A client that gives up only frees its work: `Job.cancel()` drops a queued job when it is
  reached and takes a running job's rows out of the batch at the next step.
- Liveness is observable: `health(stall_s)` says whether both lanes are alive and how long ago
  each last made progress (an iteration or an idle wake-up) while it had work pending.
- `drain()` (shutdown begins) fails every queued and running sample job and refuses new ones,
  so open streams end at once with an error; `stop()` drains, then ends the threads.

The engine imports nothing from the API: no wire format, no database.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import torch

from lorafleet.engine import scoring
from lorafleet.engine.decode import Budgets, DecodeBatch, job_state, results
from lorafleet.engine.jobs import UNORDERED, Job, WorkKind
from lorafleet.engine.queues import SampleQueue
from lorafleet.engine.residency import Residency
from lorafleet.engine.training import Training, fused_token_cap
from lorafleet.engine.types import TopLogprobs
from lorafleet.errors import Cancelled, NoCapacity, NotFound

log = logging.getLogger(__name__)


class IOWorker:
    """One thread running callables in submission order (sink calls, file and DB writes)."""

    def __init__(self, name: str) -> None:
        self._q: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], None]) -> None:
        self._q.put(fn)

    def _loop(self) -> None:
        while (fn := self._q.get()) is not None:
            try:
                fn()
            except Exception:
                log.exception("I/O worker task failed")

    def close(self, timeout: float = 30.0) -> None:
        self._q.put(None)
        self._thread.join(timeout)


class _Lane:
    """One compute thread of a scheduler: what it waits for, takes and runs, and what its
    health is judged by. `take` runs under the scheduler's lock, `step(taken)` outside it."""

    def __init__(self, name: str, loop: Callable[[_Lane], None], has_work: Callable[[], bool],
                 take: Callable[[], Any], step: Callable[[Any], None],
                 wake_at: Callable[[], float | None] = lambda: None) -> None:
        self.name = name
        self.has_work, self.take, self.step, self.wake_at = has_work, take, step, wake_at
        self.thread = threading.Thread(target=loop, args=(self,), name=name, daemon=True)
        self.progress_at = time.monotonic()  # last iteration or idle wake-up
        self.busy = False  # an iteration's work is taken and not finished yet


class Scheduler:
    """Owns one engine, its two compute lanes (training, decoding) and its I/O worker.

    Args:
        engine: the Engine (training calls on the training lane only, sampling calls on the
            decode lane only).
        base: the engine's LoadedBase (name, tokenizer, info).
        residency: slots / host cache / cold loader of this engine's adapters.
        budgets: sampling budgets (engine/decode.py `Budgets`).
        gap_timeout_s: how long a missing seq_id blocks its run before it is skipped.
        max_sample_queue: sample jobs waiting at most (more: NoCapacity, 429).
        max_fused_tokens / max_fused_logit_bytes: cap of one fused training batch.
        micro_batch_tokens: tokens of one training micro-batch (one per iteration).
    """

    def __init__(
        self,
        engine: Any,
        base: Any,
        *,
        residency: Residency | None = None,
        budgets: Budgets | None = None,
        gap_timeout_s: float = 30.0,
        max_sample_queue: int = 512,
        max_fused_tokens: int = 65536,
        max_fused_logit_bytes: int = 4 << 30,
        micro_batch_tokens: int = 1024,
        metrics: Any = None,
    ) -> None:
        self.engine = engine
        self.base = base
        self.metrics = metrics
        self.residency = residency or _local_residency(engine, metrics)
        vocab = getattr(getattr(base, "info", None), "vocab_size", 0) or 1
        self.training = Training(
            engine, max_fused_tokens=fused_token_cap(vocab, max_fused_tokens, max_fused_logit_bytes),
            micro_batch_tokens=micro_batch_tokens, gap_timeout_s=gap_timeout_s, metrics=metrics,
        )
        self.samples = SampleQueue(max_jobs=max_sample_queue)
        self.decode = DecodeBatch(engine, self.residency.table, budgets or Budgets(), self._on_token)
        self._unordered: list[Job] = []
        self._scored: dict[Job, scoring.Scored] = {}  # decoding jobs' prompt scores (engine/scoring.py)
        self._scored_tokens = 0  # prompt tokens scored in the current sampling step
        self._cv = threading.Condition()
        self._stop = False
        self._lanes = (
            _Lane(f"engine-train-{base.name}", self._loop, self._train_work, self._take_training,
                  self._train_step, self.training.wake_at),
            _Lane(f"engine-decode-{base.name}", self._loop, self._decode_work, lambda: None,
                  lambda _: self._sample_step()),
        )
        self.io = IOWorker(f"engine-io-{base.name}")
        self._closed: str | None = None  # set by drain(): new sample jobs are refused
        # OpenMP thread counts are per thread: carry the creator's setting into both lanes
        self._torch_threads = torch.get_num_threads()

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        for lane in self._lanes:
            lane.thread.start()

    @property
    def alive(self) -> bool:
        return all(lane.thread.is_alive() for lane in self._lanes)

    def drain(self, reason: str = "the server is shutting down") -> None:
        """Shutdown begins: fail queued and running sample jobs, refuse new ones (idempotent;
        running rows leave at the compute thread's next step)."""
        with self._cv:
            self._closed = reason
            queued = self.samples.drain()
            self._cv.notify_all()
        for job in queued:
            self._end_sample(job, NoCapacity(reason))

    def stop(self) -> None:
        self.drain()
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for lane in self._lanes:
            lane.thread.join(timeout=30)
        for job in self.training.drain():
            self._report(job, NoCapacity("the server is shutting down"))
        self._fail_decoding(NoCapacity("the server is shutting down"))
        self.io.close()

    def health(self, stall_s: float) -> dict[str, Any]:
        """Whether both lanes are alive and making progress.

        Unhealthy when a lane's thread is not running, or when a lane has pending work (queued,
        or an iteration in progress) but made no progress for more than `stall_s` seconds
        (`stalled_lanes` names it). `progress_age_s` is the oldest progress of a pending lane,
        or the newest of any when none is pending.
        """
        if self._cv.acquire(timeout=0.1):  # the queues are read under the lock
            try:
                pending = {lane.name: lane.busy or lane.has_work() for lane in self._lanes}
            finally:
                self._cv.release()
        else:  # a lane holds it (running unordered jobs): say pending
            pending = {lane.name: True for lane in self._lanes}
        now = time.monotonic()
        ages = {lane.name: now - lane.progress_at for lane in self._lanes}
        dead = [lane.name for lane in self._lanes if not lane.thread.is_alive()]
        stalled = [n for n in ages if pending[n] and ages[n] > stall_s]
        waiting = [ages[n] for n in ages if pending[n]]
        age = max(waiting) if waiting else min(ages.values())
        return {"ok": not dead and not stalled, "alive": not dead, "pending": any(pending.values()),
                "progress_age_s": round(age, 3), "stalled_lanes": sorted(set(stalled) | set(dead))}

    # ---- any thread ---------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        return {**self.training.stats, **self.decode.stats}

    @property
    def runs(self) -> dict:
        return self.training.runs

    @property
    def max_fused_tokens(self) -> int:
        return self.training.max_fused_tokens

    @property
    def max_sample_queue(self) -> int:
        return self.samples.max_jobs

    @max_sample_queue.setter
    def max_sample_queue(self, n: int) -> None:
        self.samples.max_jobs = n

    def knows_run(self, run_id: str) -> bool:
        with self._cv:
            return run_id in self.training.runs or run_id in self.training.pending

    def submit(self, job: Job) -> None:
        """Queue a job. Ordered training jobs are checked against their run's sequence here;
        a full sample queue raises NoCapacity."""
        with self._cv:
            if job.kind is WorkKind.SAMPLE and self._closed is not None:
                raise NoCapacity(self._closed)
            if job.kind in UNORDERED:
                if job.kind is not WorkKind.UNLOAD_RUN:
                    self.training.pending.add(job.run_id or "")
                self._unordered.append(job)
            elif job.kind is WorkKind.SAMPLE:
                self.samples.put(job)
            else:
                self.training.queue(job)
            self._cv.notify_all()

    def submit_all(self, jobs: list[Job]) -> None:
        """Queue sample jobs together, all or none: the compute thread sees them at once, so
        they are admitted into the same decode step (budgets permitting) and decode as one
        mixed batch. A sample queue without room for all of them raises NoCapacity."""
        with self._cv:
            if self._closed is not None:
                raise NoCapacity(self._closed)
            room = self.samples.max_jobs - len(self.samples)
            if len(jobs) > room:
                raise NoCapacity(f"the sampler queue has room for {max(room, 0)} more requests, "
                                 f"not {len(jobs)}", 1.0)
            for job in jobs:
                assert job.kind is WorkKind.SAMPLE, "submit_all takes sample jobs only"
                self.samples.put(job)
            self._cv.notify_all()

    # ---- the compute lanes --------------------------------------------------------------------

    def _loop(self, lane: _Lane) -> None:
        torch.set_num_threads(self._torch_threads)
        while True:
            with self._cv:
                while not self._stop and not lane.has_work():
                    lane.progress_at = time.monotonic()
                    wake = lane.wake_at()
                    self._cv.wait(timeout=5.0 if wake is None else max(0.01, wake - time.monotonic()))
                if self._stop:
                    return
                lane.progress_at = time.monotonic()
                lane.busy = True
                taken = lane.take()
            try:
                lane.step(taken)
            finally:
                lane.busy = False
                lane.progress_at = time.monotonic()

    def _take_training(self) -> list[Job]:
        """Run the unordered jobs (quick: adapter create / remove) and take the next training jobs."""
        unordered, self._unordered = self._unordered, []
        for job in unordered:
            self.training.run_unordered(job, self._report)
        return self.training.take()

    def _train_work(self) -> bool:
        return bool(self._unordered or self.training.ready())

    def _decode_work(self) -> bool:
        return bool(len(self.samples) or self.decode.busy)

    def _train_step(self, taken: list[Job]) -> None:
        """Start the taken training jobs and/or run one micro-batch; a bug fails them, not us."""
        try:
            if taken:
                self.training.start(taken, self._report)
            if self.training.current is not None:
                self.training.step(self._report)
        except Exception as e:
            log.exception("training step failed; failing its jobs")
            running = self.training.current
            self.training.current = None
            for job in taken + [i.job for i in (running.items if running is not None else ())]:
                self._report(job, e)  # a no-op for the ones already answered

    def _sample_step(self) -> None:
        """One decode step; a bug fails the jobs in the batch, and the engine goes on."""
        if self._closed is not None:
            self._fail_decoding(NoCapacity(self._closed))
            return
        self._scored_tokens = 0
        try:
            with torch.no_grad():
                self.decode.step(self._admit_next)
        except Exception as e:
            log.exception("decode step failed; failing the jobs in the batch")
            self._finish(self.decode.finished)  # the ones that ended before the failure
            self._fail_decoding(e)
            return
        self._finish(self.decode.finished)

    def _fail_decoding(self, error: Exception) -> None:
        for state in self.decode.clear():
            self._scored.pop(state.job, None)
            if not state.failed:
                self._end_sample(state.job, error)

    def _finish(self, finished: list) -> None:
        for state in finished:
            job = state.job
            if job.payload.lease is not None:  # type: ignore[union-attr]
                job.payload.lease.release()  # type: ignore[union-attr]
            if state.failed:
                self._scored.pop(job, None)
                continue  # reported when it failed
            scored = self._scored.pop(job, None)
            if job.cancelled:
                self._report(job, Cancelled("the client went away"))
            else:
                res = results(state)
                self._report(job, res if scored is None else scoring.attach(res, scored))
            if self.metrics is not None:
                self.metrics.batch_size.labels("sample").observe(sum(r.num_samples for r in state.requests))

    def _admit_next(self) -> bool:
        """Admit the next sample job that fits (least-served adapter first); False if none.

        Prompts scored this step count against the step's token budget, so a queue of
        scoring-only jobs (a teacher's top-k) cannot hold decoding rows for more than a step."""
        while True:
            if self._scored_tokens >= self.decode.budgets.max_num_batched_tokens:
                return False
            running = self._running_per_adapter()
            job = self.samples.pop(lambda key: running.get(key, 0), self._fits)
            if job is None:
                return False
            if self._admit(job):
                return True

    def _fits(self, job: Job) -> bool:
        p = job.payload
        if p.key is not None and not self.residency.can_activate(p.key):  # type: ignore[union-attr]
            return False
        # what the rows need now (vLLM-style): growth past the budget preempts the newest rows
        longest = max((len(r.prompt) for r in p.requests), default=1)  # type: ignore[union-attr]
        return self.decode.fits(p.rows, longest)  # type: ignore[union-attr]

    def _running_per_adapter(self) -> dict[Hashable | None, int]:
        counts: dict[Hashable | None, int] = {}
        for row in self.decode.rows:
            key = row.job.job.payload.key
            counts[key] = counts.get(key, 0) + 1
        return counts

    def _admit(self, job: Job) -> bool:
        """Validate, activate the adapter and hand the job to the decoder; False if it ended."""
        p = job.payload
        if job.cancelled:
            self._end_sample(job, Cancelled("the client went away"))
            return False
        try:
            slot = 0 if p.lease is None else p.lease.activate()  # type: ignore[union-attr]
            for r in p.requests:  # type: ignore[union-attr]
                self.engine.validate_sample(r)
        except Exception as e:
            self._end_sample(job, e)
            return False
        if not p.requests:  # type: ignore[union-attr]  # a warm-up: the adapter is in a slot now
            self._end_sample(job, [])
            return False
        if scoring.wants_scores(p.requests):  # type: ignore[union-attr]  # one forward of the prompt
            self._scored_tokens += sum(len(r.prompt) for r in p.requests if r.scoring is not None)  # type: ignore[union-attr]
            try:
                scored = scoring.score(self.engine, p.requests, scoring.operands_for(self.residency.table, slot))  # type: ignore[union-attr]
                if scoring.answerable(p.requests):  # type: ignore[union-attr]
                    on_token = lambda r, k, t, lp, top: self._on_token(job, r, k, t, lp, top)  # noqa: E731
                    self._end_sample(job, scoring.one_token_results(self.engine, p.requests, scored, on_token))  # type: ignore[union-attr]
                    return False
            except Exception as e:
                self._end_sample(job, e)
                return False
            self._scored[job] = scored
        self.decode.admit(job_state(job, [slot] * len(p.requests)))  # type: ignore[union-attr]
        return True

    def _end_sample(self, job: Job, outcome: Any) -> None:
        if job.payload.lease is not None:  # type: ignore[union-attr]
            job.payload.lease.release()  # type: ignore[union-attr]
        self._report(job, outcome)

    def _on_token(self, job: Job, request: int, sample: int, token: int, logprob: float,
                  top: TopLogprobs | None) -> None:
        if job.cancelled:
            return
        try:
            job.sink.on_token(job, request, sample, token, logprob, top)
        except Exception:  # a streaming client's callback failed: its rows leave, nobody else's
            log.exception("on_token failed; cancelling the job")
            job.cancel()

    def _report(self, job: Job, outcome: Any) -> None:
        """Hand a job's outcome (a result, or an Exception) to its sink on the I/O worker,
        exactly once (later reports of the same job are ignored)."""
        if not job.answer():
            return

        def deliver() -> None:
            try:
                if isinstance(outcome, Exception):
                    job.sink.failed(job, outcome)
                else:
                    job.sink.done(job, outcome)
            except Exception as e:
                log.exception("sink of %s failed", job.kind)
                if not isinstance(outcome, Exception):
                    try:
                        job.sink.failed(job, e)
                    except Exception:
                        log.exception("sink.failed of %s failed", job.kind)

        self.io.call(deliver)


def _local_residency(engine: Any, metrics: Any) -> Residency:
    """A residency manager without a store (no catalog): only adapters added to the host tier."""

    def no_store(keys: list[Any]) -> dict[Any, Any]:
        return {k: NotFound(f"{k} is not in memory and this server has no catalog") for k in keys}

    return Residency(engine, no_store, metrics=metrics)


__all__ = ["Budgets", "IOWorker", "Scheduler"]
