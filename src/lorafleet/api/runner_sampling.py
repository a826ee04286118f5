"""Sampling work of the engine thread: Tinker samples and OpenAI-API serving jobs, all in one
`engine.sample` call per turn.

A mixin of `lorafleet.api.runner.Runner` (its state lives there). Adapter tensors of both
kinds live in the runner's `Residency` (engine/residency.py), the only code that moves them
between engine slots, host memory and the store: catalog revisions are keyed by revision id
and loaded by its cold loader; Tinker sampler versions are keyed by sampler id and put into
the host tier by `_add_sampler` (fresh from training) or `_resolve_sampler` (read back from
their checkpoint when they were evicted).

Serving futures belong to their clients, who may cancel them at any moment (a closed stream):
they are resolved only through `serving.resolve`/`serving.reject` (a no-op on a done future),
a cancelled job still queued is dropped, and the rows of one already in the batch stop at
their next token (the `on_token` route returns True for them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

from lorafleet.api.tinker import wire
from lorafleet.api.tinker.futures import PROTO_TYPE
from lorafleet.engine.residency import Tier
from lorafleet.engine.serving import reject, resolve
from lorafleet.engine.types import SampleRequest, SamplingParams
from lorafleet.errors import LorafleetError, NoCapacity, NotFound
from lorafleet.lora import io as lora_io
from lorafleet.lora.weights import LoraWeights

from lorafleet.api.work import Op

log = logging.getLogger("lorafleet.tinker.runner")


class SamplingWork:
    """Sampler versions and sample batching for one engine."""

    # ------------------------------------------------------------------ sampling

    def _add_sampler(self, key: str, weights: LoraWeights) -> None:
        """Immutable sampler weights (fresh from training) into the host tier, then a slot."""
        self.residency.add_host(key, weights)
        self.residency.activate([key])  # live before the save's future completes

    def _resolve_sampler(self, op: Op) -> str | None:
        """The residency key of a Tinker sample's weights (host-resident now), None = the base."""
        p = op.payload
        key = p["sampler_key"]
        if self.residency.tier(key) != Tier.STORE:
            return key
        row = p.get("checkpoint")
        if row is None:
            if p.get("base_only"):
                return None
            raise NotFound(f"sampler weights for {key} are no longer available")
        self.residency.add_host(key, lora_io.parse_peft_files(self.checkpoints.read_files(row)).weights)
        return key

    def _run_samples(self, ops: list[Op]) -> None:
        """One engine.sample call for every queued Tinker sample and OpenAI serving request."""
        keys: dict[Op, str | None] = {}
        for op in ops:
            try:
                keys[op] = op.payload["revision_id"] if op.kind == "serve" else self._resolve_sampler(op)
            except Exception as e:
                self._sample_failed(op, e)
        for op in [op for op, k in keys.items() if op.kind == "serve" and k is not None
                   and self.residency.tier(k) is Tier.STORE]:
            del keys[op]  # evicted between admission and this batch: load it again, then requeue
            self._reload_then_requeue(op)
        if not keys:
            return
        try:  # every adapter of the batch gets its slot together: none evicts another
            handles = self.residency.activate([k for k in keys.values() if k is not None])
        except Exception as e:
            for op in keys:
                self._sample_failed(op, e)
            return
        ready: list[tuple[Op, list[Any]]] = []
        for op, key in keys.items():
            handle = None if key is None else handles[key]
            if op.kind == "serve":
                ready.append((op, [replace(r, adapter=handle) for r in op.payload["requests"]]))
            else:
                ready.append((op, [self._sample_request(handle, op.payload)]))
        batch = [r for _, reqs in ready for r in reqs]
        if not batch:  # only warm-up jobs (no requests): their adapters are in slots now
            for op, _ in ready:
                self._finish_sample(op, [])
            return
        try:
            if self.metrics is not None:
                self.metrics.batch_size.labels("sample").observe(sum(r.num_samples for r in batch))
            flat = self.engine.sample(batch, on_token=self._stream_to(ready))
        except Exception as e:
            if len(ready) > 1 and isinstance(e, LorafleetError):
                for op, reqs in ready:  # isolate the bad request
                    self._sample_alone(op, reqs)
                return
            for op, _ in ready:
                self._sample_failed(op, e)
            return
        i = 0
        for op, reqs in ready:
            self._finish_sample(op, flat[i: i + len(reqs)])
            i += len(reqs)

    def _sample_alone(self, op: Op, reqs: list[Any]) -> None:
        try:
            res = self.engine.sample(reqs, on_token=self._stream_to([(op, reqs)]))
        except Exception as e:
            self._sample_failed(op, e)
        else:
            self._finish_sample(op, res)

    def _sample_failed(self, op: Op, e: Exception) -> None:
        if op.kind == "serve":
            reject(op.payload["future"], e)
            return
        self._fail(op, e)

    # ------------------------------------------------------------------ serving (OpenAI API)

    def submit_serving(self, revision_id: str | None, requests: list[Any],
                       on_token: Callable[[int, int, int, float], None] | None = None) -> Future:
        """Queue engine SampleRequests on a catalog revision (None = the base model alone).

        The revision must already be in the host tier (`residency.ensure_host`) and should be
        pinned there until the future resolves. Returns a future of the SampleResults;
        `on_token(request, sample, token, logprob)` is called on the engine thread after every
        decode step that chose a token for this job. With no requests the job only puts the
        revision into a slot (warm-up). Raises NoCapacity when the queue is full or the runner is
        draining. Cancelling the future frees the job's work (dropped if queued, its rows stopped
        if running).
        """
        from lorafleet.engine.serving import ServeJob

        job = ServeJob(revision_id, list(requests), on_token)
        self.serving.put(job)  # NoCapacity (429) when full
        with self._cv:
            self._cv.notify_all()
        return job.future

    def _reload_then_requeue(self, op: Op) -> None:
        """A serving job whose adapter left host memory before its batch (the host cache was
        full of other loads) goes back to the cold loader; it is requeued once the load lands.
        Its hold (taken at admission) pins the weights on arrival, so this happens at most once."""
        from lorafleet.engine.serving import ServeJob

        p = op.payload
        job = ServeJob(p["revision_id"], p["requests"], p["on_token"], future=p["future"])
        try:
            load = self.residency.ensure_host(job.key)
        except LorafleetError as e:  # the load queue is full: a retryable 429
            reject(job.future, e)
            return

        def requeue(done: Future) -> None:
            if done.exception() is not None:
                reject(job.future, done.exception())
                return
            try:
                self.serving.put(job)
            except LorafleetError as e:
                reject(job.future, e)
                return
            with self._cv:
                self._cv.notify_all()

        load.add_done_callback(requeue)

    def _take_serving(self, reserved: int = 0) -> list[Op]:
        """A fair batch of serving jobs (round robin over adapters), as ops for `_run_samples`."""
        jobs = self.serving.take(max_adapters=self.residency.free_slots_for_batch() - reserved)
        self._in_batch = [j.future for j in jobs]  # what `drain` fails while they run
        if self.serving.closed is not None:  # drained between the take and the line above
            for j in jobs:
                reject(j.future, NoCapacity(self.serving.closed))
        return [Op("", "serve", "", {"revision_id": j.key, "requests": j.requests,
                                     "on_token": j.on_token, "future": j.future}) for j in jobs]

    def _sample_request(self, handle: int | None, p: dict[str, Any]) -> Any:
        params = SamplingParams(**p["params"])
        return SampleRequest(
            adapter=handle, prompt=p["prompt"], num_samples=p["num_samples"], params=params,
            prompt_logprobs=p["prompt_logprobs"],
        )

    def _finish_sample(self, op: Op, results: list[Any]) -> None:
        if op.kind == "serve":
            resolve(op.payload["future"], results)
            return
        res = results[0]
        out = wire.SampleOutcome(
            sequences=[wire.SampledSeq(list(s.tokens), [float(x) for x in s.logprobs], s.stop_reason)
                       for s in res.sequences],
            prompt_logprobs=None if res.prompt_logprobs is None else list(res.prompt_logprobs),
        )
        self.futures.complete(op.request_id, wire.encode_sample_response(out), PROTO_TYPE)

    @property
    def queued_samples(self) -> int:
        return len(self._samples)

    def _stream_to(self, ready: list[tuple[Op, list[Any]]]) -> Callable[[int, int, int, float], bool]:
        """The engine's `on_token` callback for one batch: a heartbeat every decode step; routes
        rows of serving jobs to their jobs' callbacks; stops the rows of a job that is done
        (cancelled by its client, or failed by `drain`)."""
        route: list[tuple[Op, int] | None] = []
        for op, reqs in ready:
            route.extend((op, i) if op.kind == "serve" else None for i in range(len(reqs)))
        broken: set[Op] = set()

        def on_token(request: int, sample: int, token: int, logprob: float) -> bool:
            self._beat()
            target = route[request]
            if target is None:
                return False
            op, i = target
            if op.payload["future"].done():
                return True
            cb = op.payload.get("on_token")
            if cb is None or op in broken:
                return False
            try:
                cb(i, sample, token, logprob)
            except Exception:  # a streaming client's callback must not fail the whole batch
                log.exception("on_token callback failed")
                broken.add(op)
            return False

        return on_token
