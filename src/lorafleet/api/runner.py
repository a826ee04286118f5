"""The engine thread: takes queued Tinker work, batches it, calls the engine, completes futures.

One `Runner` per resident base model, each with its own thread (the engine is synchronous and
not thread-safe; torch never runs on the event loop). HTTP handlers only validate, persist a
future and `submit` an `Op`; everything that touches tensors happens here.

Scheduling, per loop turn:
1. unordered ops (create_model, create-by-load) in arrival order;
2. training: each model's ops run strictly in `seq_id` order. The ready prefix of
   forward/forward_backward ops of *every* model is fused into one `engine.forward_backward`
   call (weights do not change until `optim_step`, so a model's consecutive chunks fuse too);
   then at most one barrier op (optim_step, save, load) per model;
3. sampling: all queued sample requests (any adapter, any sampler version) and OpenAI-API
   serving requests (catalog revisions through the residency manager) in one `engine.sample`
   call.
A missing seq_id blocks its model for `gap_timeout_s` (chunks of one call arrive concurrently,
first chunk last), then the runner skips the hole and logs it.
A failed forward_backward discards the model's partial gradients and poisons the window: the
next optim_step fails instead of applying a partial update.

Guarantees (keep them when this moves):
- The thread never dies of a request. Each phase of a turn runs guarded: an unexpected
  exception fails that phase's still-unanswered work with a server error, is logged, and the
  loop goes on.
- A client that gives up only frees its work: serving futures may be cancelled at any time;
  a cancelled job still queued is dropped, the rows of one in the running batch stop at their
  next token (engine `on_token` returns True), and nothing is ever set on a cancelled future.
- Liveness is observable: `health()` says whether the thread is alive and how long ago it last
  made progress (a loop turn, an idle wake-up, a decode step) while work was pending.
- `drain()` (shutdown begins) fails every queued and running serving job and refuses new ones,
  so open streams end at once with an error event; `stop()` drains, then ends the thread.

This module holds the loop and the scheduling; the work itself is in `runner_training.py`
(runs, forward_backward, optim_step, saves) and `runner_sampling.py` (sampler versions,
samples, OpenAI-API serving jobs), mixed into `Runner`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import torch

from lorafleet.api.runner_sampling import SamplingWork
from lorafleet.api.runner_training import TrainingWork
from lorafleet.api.tinker.checkpoints import Checkpoints
from lorafleet.api.tinker.futures import PENDING, FutureTable
from lorafleet.api.tinker.store import TinkerStore
from lorafleet.api.work import BARRIERS, FWDBWD, LiveModel, Op
from lorafleet.engine.serving import reject
from lorafleet.errors import InvalidRequest, NoCapacity, NotFound

__all__ = ["FWDBWD", "LiveModel", "Op", "Runner"]
log = logging.getLogger("lorafleet.tinker.runner")


class Runner(TrainingWork, SamplingWork):
    """Owns one engine and the thread that drives it."""

    def __init__(
        self,
        engine: Any,
        base: Any,
        futures: FutureTable,
        store: TinkerStore,
        checkpoints: Checkpoints,
        *,
        gap_timeout_s: float = 30.0,
        max_sample_queue: int = 512,
        max_fused_tokens: int = 65536,
        max_fused_logit_bytes: int = 4 << 30,
        catalog: Any = None,
        residency: Any = None,
        metrics: Any = None,
    ) -> None:
        self.engine = engine
        self.base = base
        self.futures = futures
        self.store = store
        self.checkpoints = checkpoints
        self.gap_timeout_s = gap_timeout_s
        self.max_sample_queue = max_sample_queue
        # a fused batch holds its full-vocabulary logits ~3 times (logits, softmax, grads):
        # 9 fused SmolLM2 policies reached 15.5 GB, so cap the tokens by that memory too
        vocab = getattr(getattr(base, "info", None), "vocab_size", 0) or 1
        self.max_fused_tokens = max(1, min(max_fused_tokens, max_fused_logit_bytes // (vocab * 4 * 3)))
        self.catalog = catalog  # a CatalogBridge, or None to keep checkpoints local only
        self.metrics = metrics  # lorafleet.metrics.Metrics: batch sizes and tokens
        # engine.residency.Residency: every adapter version that samples (catalog revisions
        # served over the OpenAI API, Tinker sampler versions) is moved between tiers by it
        self.residency = residency or _local_residency(engine, metrics)
        from lorafleet.engine.serving import ServingQueue

        self.serving = ServingQueue(max_jobs=max_sample_queue)
        self.models: dict[str, LiveModel] = {}
        self._unordered: deque[Op] = deque()
        self._samples: deque[Op] = deque()
        self._pending_models: set[str] = set()
        self._cv = threading.Condition()
        self._stop = False
        self._progress_at = time.monotonic()  # last loop turn, idle wake-up or decode step
        self._busy = False  # a turn's work is taken and not finished yet
        self._in_batch: list[Any] = []  # futures of the serving jobs in the running engine.sample
        self._thread = threading.Thread(target=self._loop, name=f"engine-{base.name}", daemon=True)
        self.stats = {"fused_calls": 0, "fused_requests": 0, "max_fused_models": 0}
        # OpenMP thread counts are per thread: carry the creator's setting into the engine thread
        self._torch_threads = torch.get_num_threads()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread.start()

    def drain(self) -> None:
        """Shutdown begins: fail queued and running serving jobs, refuse new ones (idempotent)."""
        self.serving.close("the server is shutting down")
        for future in list(self._in_batch):
            reject(future, NoCapacity("the server is shutting down"))

    def stop(self) -> None:
        self.drain()
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def health(self, stall_s: float) -> dict[str, Any]:
        """Whether the engine thread is alive and making progress (any thread).

        Unhealthy when the thread is not running, or when it has pending work (queued, or a turn
        in progress) but made no progress for more than `stall_s` seconds.
        """
        alive = self._thread.is_alive()
        pending = self._busy or bool(self._unordered or self._samples or len(self.serving)
                                     or any(m.ops for m in list(self.models.values())))
        age = time.monotonic() - self._progress_at
        return {"ok": alive and not (pending and age > stall_s), "alive": alive,
                "pending": pending, "progress_age_s": round(age, 3)}

    def _beat(self) -> None:
        self._progress_at = time.monotonic()

    # ------------------------------------------------------------------ submit (event loop)

    def knows_model(self, model_id: str) -> bool:
        return model_id in self.models or model_id in self._pending_models

    def submit(self, op: Op) -> None:
        """Queue an op. Ordered ops are checked against their model's sequence here."""
        with self._cv:
            if op.kind in ("create_model", "load_create", "unload"):
                if op.kind != "unload":
                    self._pending_models.add(op.payload["model_id"])
                self._unordered.append(op)
            elif op.kind == "sample":
                if len(self._samples) >= self.max_sample_queue:
                    raise NoCapacity("the sampler queue is full", retry_after_s=1.0)
                self._samples.append(op)
            else:
                self._queue_ordered(op)
            self._cv.notify_all()

    def _queue_ordered(self, op: Op) -> None:
        model = self.models.get(op.model_id or "")
        if model is None:
            if op.model_id in self._pending_models:
                raise InvalidRequest(f"model {op.model_id} is still being created")
            raise NotFound(f"training run {op.model_id} is not loaded")
        seq = op.seq_id or 0
        if seq < model.next_seq or seq in model.ops:
            raise InvalidRequest(
                f"seq_id {seq} of {op.model_id} was already used (next is {model.next_seq})"
            )
        model.ops[seq] = op

    # ------------------------------------------------------------------ the loop (engine thread)

    def _loop(self) -> None:
        torch.set_num_threads(self._torch_threads)
        torch.set_grad_enabled(True)
        while True:
            with self._cv:
                while not self._stop and not self._has_ready_work():
                    self._beat()
                    self._cv.wait(timeout=self._wait_s())
                if self._stop:
                    return
                self._beat()
                self._busy = True
                unordered = list(self._unordered)
                self._unordered.clear()
                fused = self._take_fused()
                barriers = self._take_barriers() if not fused else []
                samples = list(self._samples)
                self._samples.clear()
            try:
                self._turn(unordered, fused, barriers, samples)
            finally:
                self._in_batch = []
                self._busy = False
                self._beat()

    def _turn(self, unordered: list[Op], fused: list[tuple[LiveModel, Op]],
              barriers: list[tuple[LiveModel, Op]], samples: list[Op]) -> None:
        for op in unordered:
            self._guarded([op], self._run_one, op)
        if fused:
            self._guarded([op for _, op in fused], self._run_fused, fused)
        for model, op in barriers:
            self._guarded([op], self._run_one, op, model)
        tinker_keys = {op.payload["sampler_key"] for op in samples}
        self._guarded([], lambda: samples.extend(self._take_serving(reserved=len(tinker_keys))))
        if samples:
            self._guarded(samples, self._run_samples, samples)

    def _guarded(self, ops: list[Op], work: Any, *args: Any) -> None:
        """Run one phase of a turn; a bug fails its unanswered ops instead of the thread."""
        try:
            work(*args)
        except Exception as e:
            log.exception("engine turn failed; failing %d of its requests", len(ops))
            for op in ops:
                if op.kind == "serve":
                    reject(op.payload["future"], e)
                elif op.request_id and self.futures.state_of(op.request_id) == PENDING:
                    self._fail(op, e)

    def _wait_s(self) -> float:
        waits = [m.gap_since for m in self.models.values() if m.gap_since is not None]
        if not waits:
            return 5.0
        return max(0.01, min(waits) + self.gap_timeout_s - time.monotonic())

    def _head(self, model: LiveModel) -> Op | None:
        op = model.ops.get(model.next_seq)
        if op is not None:
            model.gap_since = None
            return op
        if not model.ops:
            model.gap_since = None
            return None
        t = time.monotonic()
        if model.gap_since is None:
            model.gap_since = t
        if t - model.gap_since >= self.gap_timeout_s:
            first = min(model.ops)
            log.warning("%s: seq_ids %d..%d never arrived; skipping the gap",
                        model.model_id, model.next_seq, first - 1)
            model.next_seq = first
            model.gap_since = None
            return model.ops[first]
        return None

    def _has_ready_work(self) -> bool:
        if self._unordered or self._samples or len(self.serving):
            return True
        return any(self._head(m) is not None for m in self.models.values())

    def _take_fused(self) -> list[tuple[LiveModel, Op]]:
        taken: list[tuple[LiveModel, Op]] = []
        tokens = 0
        for model in self.models.values():
            while True:
                op = self._head(model)
                if op is None or op.kind != FWDBWD:
                    break
                n = sum(d.tokens.size for d in op.payload.data)
                if taken and tokens + n > self.max_fused_tokens:
                    return taken
                tokens += n
                del model.ops[model.next_seq]
                model.next_seq += 1
                taken.append((model, op))
        return taken

    def _take_barriers(self) -> list[tuple[LiveModel, Op]]:
        taken = []
        for model in self.models.values():
            op = self._head(model)
            if op is not None and op.kind in BARRIERS:
                del model.ops[model.next_seq]
                model.next_seq += 1
                taken.append((model, op))
        return taken

    # ------------------------------------------------------------------ dispatch

    def _run_one(self, op: Op, model: LiveModel | None = None) -> None:
        handler = getattr(self, f"_do_{op.kind}")
        try:
            result = handler(op, model) if model is not None else handler(op)
        except Exception as e:  # a user error, or a bug / engine failure (logged): keep serving
            self._fail(op, e)
        else:
            if op.request_id:
                self.futures.complete_json(op.request_id, result)
        finally:
            if op.kind in ("create_model", "load_create"):
                with self._cv:
                    self._pending_models.discard(op.payload["model_id"])

    def _fail(self, op: Op, exc: BaseException) -> str:
        """Fail the op's future; returns the message its client sees (see FutureTable.fail)."""
        return self.futures.fail(op.request_id, exc, f"{op.kind} {op.request_id}")


def _local_residency(engine: Any, metrics: Any) -> Any:
    """A residency manager without a store (no catalog): Tinker sampler versions only."""
    from lorafleet.engine.residency import Residency

    def no_store(keys: list[Any]) -> dict[Any, Any]:
        return {k: NotFound(f"{k} is not in memory and this server has no catalog") for k in keys}

    return Residency(engine, no_store, metrics=metrics)
