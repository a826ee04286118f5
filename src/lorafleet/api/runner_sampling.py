"""Sampling work of the engine thread: frozen sampler versions, Tinker samples and OpenAI-API
serving jobs, all in one `engine.sample` call per turn.

A mixin of `lorafleet.api.runner.Runner` (its state lives there). Every sampler checkpoint is
an immutable `SamplerVersion`; the newest `max_live_samplers` hold engine handles, the rest
keep host tensors (up to `max_sampler_versions`) and are re-activated on demand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

import torch

from lorafleet.api.tinker import wire
from lorafleet.api.tinker.futures import PROTO_TYPE
from lorafleet.errors import InvalidRequest, LorafleetError, NotFound
from lorafleet.lora import io as lora_io
from lorafleet.lora.spec import LoraSpec

from lorafleet.api.work import Op

log = logging.getLogger("lorafleet.tinker.runner")


@dataclass(slots=True)
class SamplerVersion:
    """Immutable weights a sampler samples from; `tensors` None = the base model itself."""

    spec: LoraSpec | None
    tensors: dict[str, torch.Tensor] | None
    handle: int | None = None


class SamplingWork:
    """Sampler versions and sample batching for one engine."""

    # ------------------------------------------------------------------ sampling

    def _add_sampler(self, key: str, version: SamplerVersion) -> None:
        self.samplers[key] = version
        self.samplers.move_to_end(key)
        while len(self.samplers) > self.max_sampler_versions:
            _, old = self.samplers.popitem(last=False)
            if old.handle is not None:
                self.engine.remove_adapter(old.handle)

    def _activate(self, key: str) -> int | None:
        version = self.samplers[key]
        self.samplers.move_to_end(key)
        if version.tensors is None or version.handle is not None:
            return version.handle
        live = [v for v in self.samplers.values() if v.handle is not None]
        while len(live) >= self.max_live_samplers:
            victim = live.pop(0)
            self.engine.remove_adapter(victim.handle)
            victim.handle = None
        handle = self.engine.create_adapter(version.spec)
        self.engine.set_tensors(handle, version.tensors)
        version.handle = handle
        return handle

    def _resolve_sampler(self, op: Op) -> int | None:
        p = op.payload
        key = p["sampler_key"]
        if key not in self.samplers:
            row = p.get("checkpoint")
            if row is None:
                if p.get("base_only"):
                    self.samplers[key] = SamplerVersion(None, None)
                else:
                    raise NotFound(f"sampler weights for {key} are no longer available")
            else:
                adapter = lora_io.parse_peft_files(self.checkpoints.read_files(row))
                self._add_sampler(key, SamplerVersion(adapter.spec, adapter.tensors))
        return self._activate(key)

    def _run_samples(self, ops: list[Op]) -> None:
        """One engine.sample call for every queued Tinker sample and OpenAI serving request."""
        serving = self._activate_serving([op for op in ops if op.kind == "serve"])
        ready: list[tuple[Op, list[Any]]] = []
        for op in ops:
            try:
                if op.kind == "serve":
                    if op not in serving:
                        continue
                    handle = serving[op]
                    ready.append((op, [replace(r, adapter=handle) for r in op.payload["requests"]]))
                else:
                    handle = self._resolve_sampler(op)
                    ready.append((op, [self._sample_request(handle, op.payload)]))
            except Exception as e:
                self._sample_failed(op, e)
        if not ready:
            return
        try:
            batch = [r for _, reqs in ready for r in reqs]
            if self.metrics is not None:
                self.metrics.batch_size.labels("sample").observe(sum(r.num_samples for r in batch))
            flat = self.engine.sample(batch)
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

    def _activate_serving(self, ops: list[Op]) -> dict[Op, int | None]:
        """Engine handles for the serving requests' revisions, all activated together."""
        keys = [op.payload["revision_id"] for op in ops if op.payload["revision_id"] is not None]
        try:
            handles = self.residency.activate(keys) if keys else {}
        except Exception as e:
            for op in ops:
                self._sample_failed(op, e)
            return {}
        return {op: handles.get(op.payload["revision_id"]) for op in ops}

    def _sample_alone(self, op: Op, reqs: list[Any]) -> None:
        try:
            res = self.engine.sample(reqs)
        except Exception as e:
            self._sample_failed(op, e)
        else:
            self._finish_sample(op, res)

    def _sample_failed(self, op: Op, e: Exception) -> None:
        if op.kind == "serve":
            op.payload["future"].set_exception(e)
            return
        if isinstance(e, LorafleetError):
            self._fail(op, str(e), "user")
        else:
            log.error("sample %s failed", op.request_id, exc_info=e)
            self._fail(op, f"{type(e).__name__}: {e}", "server")

    # ------------------------------------------------------------------ serving (OpenAI API)

    def submit_serving(self, revision_id: str | None, requests: list[Any],
                       on_token: Callable[[int, int, int, float], None] | None = None) -> Future:
        """Queue engine SampleRequests on a catalog revision (None = the base model alone).

        The revision must already be in the host tier (`residency.ensure_host`). Returns a
        future of the SampleResults; `on_token(request, sample, token, logprob)` is called for
        every generated token once its batch finishes. Raises NoCapacity when the queue is full.
        """
        if revision_id is not None and self.residency is None:
            raise InvalidRequest("this server has no catalog: only base models can be served")
        from lorafleet.engine.serving import ServeJob

        job = ServeJob(revision_id, list(requests), on_token)
        self.serving.put(job)  # NoCapacity (429) when full
        with self._cv:
            self._cv.notify_all()
        return job.future

    def _take_serving(self) -> list[Op]:
        """A fair batch of serving jobs (round robin over adapters), as ops for `_run_samples`."""
        jobs = self.serving.take(max_adapters=self.max_serving_adapters)
        return [Op("", "serve", "", {"revision_id": j.key, "requests": j.requests,
                                     "on_token": j.on_token, "future": j.future}) for j in jobs]

    def _sample_request(self, handle: int | None, p: dict[str, Any]) -> Any:
        params = self.t.SamplingParams(**p["params"])
        return self.t.SampleRequest(
            adapter=handle, prompt=p["prompt"], num_samples=p["num_samples"], params=params,
            prompt_logprobs=p["prompt_logprobs"],
        )

    def _finish_sample(self, op: Op, results: list[Any]) -> None:
        if op.kind == "serve":
            callback = op.payload["on_token"]
            try:
                if callback is not None:
                    for i, res in enumerate(results):
                        for j, seq in enumerate(res.sequences):
                            for tok, lp in zip(seq.tokens, seq.logprobs):
                                callback(i, j, tok, lp)
            except Exception as e:
                op.payload["future"].set_exception(e)
                return
            op.payload["future"].set_result(results)
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
