"""Training work on the scheduler's training lane: runs, fused forward_backward in micro-batches, optim
steps, snapshots.

Each resident run has an `OrderedQueue`; its jobs run in seq_id order. The ready prefix of
forward_backward jobs of *every* run is fused into one batch (weights do not change until
`optim_step`, so a run's consecutive chunks fuse too), capped at `max_fused_tokens`. The
fused batch is then split into micro-batches of at most `micro_batch_tokens` tokens (which bound
the activations held for one backward), one per iteration of the training lane; the decode lane
runs beside it (engine/scheduler.py). Gradients accumulate across micro-batches
exactly as across calls (losses are sums). When no forward_backward is ready, at most one
barrier job (optim_step, save, load_weights) per run runs.

Validation happens before any compute (the engine adds no gradient for a refused request),
so a bad request fails alone and innocent runs keep the gradients they accumulated. A failed
forward_backward discards its run's partial gradients and poisons the window: the next
optim_step fails instead of applying a partial update. A failure in the middle of a fused
batch poisons every run in it.

Saves only snapshot tensors here (CPU fp32 copies); the sink writes files on the I/O worker.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lorafleet.engine.jobs import (
    BARRIERS,
    CreateRun,
    ForwardBackward,
    Job,
    LoadRun,
    LoadWeights,
    OptimStep,
    RunState,
    Save,
    Snapshot,
    StepResult,
    UnloadRun,
    WorkKind,
)
from lorafleet.engine.queues import OrderedQueue
from lorafleet.errors import Conflict, InvalidRequest, LorafleetError, NotFound
from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.weights import LoraWeights
from lorafleet.train.types import AdamParams, FwdBwdRequest, FwdBwdResult

log = logging.getLogger(__name__)

Report = Callable[[Job, Any], None]  # (job, result or Exception)


@dataclass(slots=True, eq=False)
class Run:
    """A training run resident in this engine."""

    run_id: str
    tenant: str
    handle: int
    spec: LoraSpec
    step: int = 0
    parent: str | None = None
    poisoned: str | None = None
    batches: Any = field(default_factory=hashlib.sha256)  # digest of data since the last save
    last_loss: dict[str, Any] | None = None
    last_adam: AdamParams | None = None
    queue: OrderedQueue = field(init=False)

    def __post_init__(self) -> None:
        self.queue = OrderedQueue(self.run_id)

    def state(self) -> RunState:
        return RunState(self.run_id, self.spec, self.step, self.parent, self.batches.hexdigest(),
                        self.last_loss, self.last_adam)


@dataclass(slots=True, eq=False)
class _Item:
    run: Run
    job: Job
    request: FwdBwdRequest
    outputs: list[dict[str, torch.Tensor]] = field(default_factory=list)
    loss: float = 0.0


@dataclass(slots=True, eq=False)
class _Fused:
    """A fused batch in progress: its items and the micro-batches left to run."""

    items: list[_Item]
    chunks: list[list[tuple[int, int, int]]]  # per micro-batch: (item, first datum, end datum)


class Training:
    """The training side of one engine's scheduler. Engine-thread methods unless noted."""

    def __init__(self, engine: Any, *, max_fused_tokens: int, micro_batch_tokens: int,
                 gap_timeout_s: float, metrics: Any = None) -> None:
        self.engine = engine
        self.max_fused_tokens = max_fused_tokens
        self.micro_batch_tokens = max(1, micro_batch_tokens)
        self.gap_timeout_s = gap_timeout_s
        self.metrics = metrics
        self.runs: dict[str, Run] = {}
        self.pending: set[str] = set()  # runs whose create job is queued
        self.current: _Fused | None = None
        self.stats = {"fused_calls": 0, "fused_requests": 0, "max_fused_models": 0, "micro_batches": 0}

    # ---- any thread (the scheduler holds its lock) ------------------------------------------

    def queue(self, job: Job) -> None:
        run = self.runs.get(job.run_id or "")
        if run is None:
            if job.run_id in self.pending:
                raise InvalidRequest(f"model {job.run_id} is still being created")
            raise NotFound(f"training run {job.run_id} is not loaded")
        run.queue.put(job)

    def ready(self) -> bool:
        if self.current is not None:
            return True
        return any(r.queue.head(self.gap_timeout_s) is not None for r in self.runs.values())

    def wake_at(self) -> float | None:
        times = [t for r in self.runs.values() if (t := r.queue.wait_until(self.gap_timeout_s))]
        return min(times) if times else None

    def take(self) -> list[Job]:
        """Under the scheduler lock: the jobs of the next training step (fused or barriers)."""
        if self.current is not None:
            return []
        taken: list[Job] = []
        tokens = 0
        for run in self.runs.values():
            while (job := run.queue.head(self.gap_timeout_s)) is not None and job.kind is WorkKind.FORWARD_BACKWARD:
                n = job.payload.tokens  # type: ignore[union-attr]
                if taken and tokens + n > self.max_fused_tokens:
                    return taken
                tokens += n
                taken.append(run.queue.pop())
        if taken:
            return taken
        for run in self.runs.values():
            job = run.queue.head(self.gap_timeout_s)
            if job is not None and job.kind in BARRIERS:
                taken.append(run.queue.pop())
        return taken

    # ---- engine thread ----------------------------------------------------------------------

    def run_unordered(self, job: Job, report: Report) -> None:
        try:
            if job.kind is WorkKind.CREATE_RUN:
                result = self._create(job)
            elif job.kind is WorkKind.LOAD_RUN:
                result = self._load_run(job)
            else:
                result = self._unload(job, report)
        except Exception as e:
            if not isinstance(e, LorafleetError):
                log.error("%s of %s failed", job.kind, job.run_id, exc_info=e)
            result = e
        finally:
            self.pending.discard(job.run_id or "")
        report(job, result)

    def _create(self, job: Job) -> RunState:
        p: CreateRun = job.payload  # type: ignore[assignment]
        handle = self.engine.create_adapter(p.spec, seed=p.seed)
        run = self.runs[job.run_id] = Run(job.run_id, job.tenant, handle, p.spec)  # type: ignore[arg-type]
        return run.state()

    def _load_run(self, job: Job) -> RunState:
        p: LoadRun = job.payload  # type: ignore[assignment]
        handle = self.engine.create_adapter(p.weights.spec, weights=p.weights)
        try:
            if p.optimizer is not None:
                self.engine.load_optimizer_state(handle, p.optimizer)
        except Exception:
            self.engine.remove_adapter(handle)
            raise
        run = Run(job.run_id, job.tenant, handle, p.weights.spec, step=p.step, parent=p.parent)  # type: ignore[arg-type]
        self.runs[run.run_id] = run
        return run.state()

    def _unload(self, job: Job, report: Report) -> RunState | None:
        """Drop a run's adapter (its session ended); its queued jobs fail."""
        p: UnloadRun = job.payload  # type: ignore[assignment]
        run = self.runs.pop(job.run_id or "", None)
        if run is None:
            return None
        self.engine.remove_adapter(run.handle)
        for queued in run.queue.jobs.values():
            report(queued, Conflict(f"training run {run.run_id} was unloaded: {p.reason}"))
        run.queue.jobs.clear()
        return run.state()

    def start(self, jobs: list[Job], report: Report) -> None:
        """Begin a training step: a fused batch (validated, split) or barrier jobs (run now)."""
        if not jobs:
            return
        if jobs[0].kind is not WorkKind.FORWARD_BACKWARD:
            for job in jobs:
                report(job, self._barrier(job))
            return
        items: list[_Item] = []
        for job in jobs:
            run = self.runs.get(job.run_id or "")
            if run is None:
                report(job, NotFound(f"training run {job.run_id} is not loaded"))
                continue
            p: ForwardBackward = job.payload  # type: ignore[assignment]
            req = FwdBwdRequest(adapter=run.handle, data=p.data, loss_fn=p.loss_fn,
                                loss_config=dict(p.loss_config), forward_only=p.forward_only)
            try:
                self.engine.validate(req)
            except LorafleetError as e:
                self._poison(run, job, e, report)
                continue
            items.append(_Item(run, job, req))
        if not items:
            return
        self.stats["fused_calls"] += 1
        self.stats["fused_requests"] += len(items)
        self.stats["max_fused_models"] = max(self.stats["max_fused_models"], len({i.run.run_id for i in items}))
        if self.metrics is not None:
            self.metrics.batch_size.labels("train").observe(sum(len(i.request.data) for i in items))
            self.metrics.tokens.labels("train").inc(sum(i.job.payload.tokens for i in items))  # type: ignore[union-attr]
        self.current = _Fused(items, self._split(items))

    def _split(self, items: list[_Item]) -> list[list[tuple[int, int, int]]]:
        """Micro-batches of at most `micro_batch_tokens` tokens (a longer datum goes alone)."""
        chunks: list[list[tuple[int, int, int]]] = [[]]
        tokens = 0
        for i, item in enumerate(items):
            start = 0
            for d, datum in enumerate(item.request.data):
                n = int(datum.tokens.numel())
                if tokens and tokens + n > self.micro_batch_tokens:
                    if d > start:
                        chunks[-1].append((i, start, d))
                    chunks.append([])
                    start, tokens = d, 0
                tokens += n
            chunks[-1].append((i, start, len(item.request.data)))
        return [c for c in chunks if c]

    def step(self, report: Report) -> None:
        """Run the next micro-batch of the fused batch in progress; finish it after the last."""
        fused = self.current
        if fused is None:
            return
        chunk = fused.chunks.pop(0)
        reqs = [_replace_data(fused.items[i].request, s, e) for i, s, e in chunk]
        self.stats["micro_batches"] += 1
        try:
            results = self.engine.forward_backward(reqs)
        except Exception as e:  # mid-computation failure: every run in the batch is suspect
            self.current = None
            for item in fused.items:
                self._poison(item.run, item.job, e, report)
            return
        for (i, _, _), res in zip(chunk, results, strict=True):
            fused.items[i].outputs += res.outputs
            fused.items[i].loss += float(res.metrics.get("loss:sum", 0.0))
        if fused.chunks:
            return
        self.current = None
        for item in fused.items:
            p: ForwardBackward = item.job.payload  # type: ignore[assignment]
            if not _finite(item):  # diverged: its gradients must not reach optim_step
                self._poison(item.run, item.job, InvalidRequest(NOT_FINITE), report)
                continue
            if not p.forward_only:
                item.run.batches.update(p.fingerprint.encode())
                item.run.last_loss = {"loss_fn": p.loss_fn, "loss_config": dict(p.loss_config)}
            report(item.job, FwdBwdResult(outputs=item.outputs, metrics={"loss:sum": item.loss}))

    def _poison(self, run: Run, job: Job, e: Exception, report: Report) -> None:
        try:
            self.engine.discard_grads(run.handle)
        except Exception:
            log.exception("discard_grads failed for %s", run.run_id)
        if not job.payload.forward_only:  # type: ignore[union-attr]
            run.poisoned = f"forward_backward {job.tag} failed: {e}"
        if not isinstance(e, LorafleetError):
            log.error("forward_backward failed", exc_info=e)
        report(job, e)

    def _barrier(self, job: Job) -> Any:
        run = self.runs.get(job.run_id or "")
        if run is None:
            return NotFound(f"training run {job.run_id} is not loaded")
        try:
            if job.kind is WorkKind.OPTIM_STEP:
                return self._optim_step(run, job.payload)  # type: ignore[arg-type]
            if job.kind is WorkKind.SAVE:
                return self._snapshot(run, job.payload)  # type: ignore[arg-type]
            return self._load_weights(run, job.payload)  # type: ignore[arg-type]
        except Exception as e:
            if not isinstance(e, LorafleetError):
                log.error("%s of %s failed", job.kind, run.run_id, exc_info=e)
            return e

    def _optim_step(self, run: Run, p: OptimStep) -> StepResult:
        if run.poisoned:
            reason, run.poisoned = run.poisoned, None
            self.engine.discard_grads(run.handle)
            raise InvalidRequest(f"optim_step refused: {reason}; its partial gradients were discarded")
        metrics = self.engine.optim_step(run.handle, p.adam)
        run.step += 1
        run.last_adam = p.adam
        return StepResult({k: float(v) for k, v in (metrics or {}).items()}, run.state())

    def _snapshot(self, run: Run, p: Save) -> Snapshot:
        weights = self.engine.get_weights(run.handle)
        weights = LoraWeights(weights.spec, {k: (a.to("cpu", torch.float32), b.to("cpu", torch.float32))
                                             for k, (a, b) in weights.pairs.items()})
        optimizer = None
        if p.with_optimizer:
            optimizer = {k: v.detach().to("cpu").contiguous().clone()
                         for k, v in self.engine.optimizer_state(run.handle).items()}
        snap = Snapshot(weights, optimizer, run.state())
        if p.parent is not None:
            run.parent = p.parent
            run.batches = hashlib.sha256()
        return snap

    def _load_weights(self, run: Run, p: LoadWeights) -> RunState:
        if p.weights.spec != run.spec:
            raise InvalidRequest(
                f"checkpoint LoRA (rank {p.weights.spec.rank}) does not match model {run.run_id} "
                f"(rank {run.spec.rank})"
            )
        self.engine.discard_grads(run.handle)
        self.engine.set_weights(run.handle, p.weights)
        if p.optimizer is not None:
            self.engine.load_optimizer_state(run.handle, p.optimizer)
        run.parent = p.parent
        if p.step is not None:
            run.step = p.step
        return run.state()

    def drain(self) -> list[Job]:
        """Every queued or running training job (shutdown)."""
        jobs = [j for r in self.runs.values() for j in r.queue.jobs.values()]
        if self.current is not None:
            jobs += [i.job for i in self.current.items]
            self.current = None
        for r in self.runs.values():
            r.queue.jobs.clear()
        return jobs


NOT_FINITE = ("the result holds NaN or infinity: training diverged (lower the learning rate, "
              "check the loss inputs) or the weights are no longer finite")


def _finite(item: _Item) -> bool:
    return math.isfinite(item.loss) and all(bool(torch.isfinite(t).all()) for o in item.outputs
                                            for t in o.values() if t.is_floating_point())


def _replace_data(req: FwdBwdRequest, start: int, end: int) -> FwdBwdRequest:
    if start == 0 and end == len(req.data):
        return req
    return FwdBwdRequest(adapter=req.adapter, data=req.data[start:end], loss_fn=req.loss_fn,
                         loss_config=req.loss_config, forward_only=req.forward_only,
                         replay_routes=req.replay_routes)


def fused_token_cap(vocab_size: int, max_fused_tokens: int, max_fused_logit_bytes: int) -> int:
    """A fused batch holds its full-vocabulary logits ~3 times (logits, softmax, grads): 9 fused
    SmolLM2 policies reached 15.5 GB, so cap its tokens by that memory too."""
    return max(1, min(max_fused_tokens, max_fused_logit_bytes // (max(vocab_size, 1) * 4 * 3)))


__all__ = ["Run", "Training", "fused_token_cap"]
