"""VllmSampler: a scheduler's SAMPLE jobs run on a vLLM server instead of lorafleet's decoder.

Each job (engine/jobs.py `Sample`: requests on one adapter version, with its residency lease)
runs on a worker thread: wait for the lease's host load (the cold loader, as for the embedded
engine), activate the adapter in vLLM (engine/vllm/residency.py: write its PEFT folder, load it),
then one `POST /v1/completions` per request with the prompt as token ids, `n` = num_samples,
streamed, `return_token_ids` and `logprobs=0` (each sampled token's logprob, from the raw
logits: `--logprobs-mode raw_logprobs`, as lorafleet's engine reports them). Every token goes
to the job's sink (`on_token`, so OpenAI streams and Tinker results are built exactly as for the
embedded engine); the result is a list of `SampleResult`. Prompt logprobs come from a
non-streamed request (vLLM does not stream them).

Failures: vLLM down or restarting, or its connection dropping mid-stream, is `Unavailable`
(503 + Retry-After; a retryable Tinker error) at once: a request never waits on a dead server.
A cancelled job (the client went away) closes its stream, which aborts the request in vLLM.

The CPU index -1 defect (vLLM 0.32's torch LoRA ops on CPU read the no-LoRA index -1 as the
last slot, so base-model rows in a batch that also has adapter rows get an adapter applied;
upstream vllm-project/vllm#48421 and #49656): with `identity_for_base`, base-model requests run
as the zero adapter `lf-identity` (B = 0: exactly the base's outputs), so no row of a vLLM batch
is ever a no-LoRA row. lorafleet turns it on where it starts vLLM on CPU; remove it (and
`folders.write_identity`) once a vLLM release with those fixes is pinned. The GPU (Triton)
kernels are not affected.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from lorafleet.engine.jobs import Job
from lorafleet.engine.types import SampledSequence, SampleRequest, SampleResult
from lorafleet.engine.vllm.folders import IDENTITY
from lorafleet.engine.vllm.process import VllmProcess
from lorafleet.engine.vllm.residency import VllmResidency
from lorafleet.errors import Cancelled, InvalidRequest, NoCapacity, Unavailable

log = logging.getLogger(__name__)

_STOP = {"stop": "stop", "length": "length", "abort": "abort"}


def completion_body(model: str, req: SampleRequest, *, stream: bool) -> dict[str, Any]:
    """vLLM's /v1/completions request for one lorafleet SampleRequest (token ids in and out)."""
    p = req.params
    body: dict[str, Any] = {
        "model": model, "prompt": list(req.prompt), "n": req.num_samples, "max_tokens": p.max_tokens,
        "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k if p.top_k > 0 else -1,
        "logprobs": 0, "return_token_ids": True, "stream": stream, "skip_special_tokens": False,
        "include_stop_str_in_output": True, "add_special_tokens": False,
    }
    if p.seed is not None:
        body["seed"] = p.seed
    if p.stop_strings:
        body["stop"] = list(p.stop_strings)
    if p.stop_token_ids is not None:  # these ids instead of EOS (an empty tuple: none at all)
        body["ignore_eos"] = True
        body["stop_token_ids"] = list(p.stop_token_ids)
    if req.prompt_logprobs:
        body["prompt_logprobs"] = 0
    return body


class VllmSampler:
    """Runs SAMPLE jobs on vLLM. `report(job, outcome)` is the scheduler's exactly-once sink call."""

    def __init__(self, process: VllmProcess, residency: VllmResidency, engine: Any, served_name: str,
                 report: Callable[[Job, Any], None], *, identity_for_base: bool, max_jobs: int = 512,
                 workers: int = 64, read_timeout_s: float = 600.0) -> None:
        self.process = process
        self.residency = residency
        self.engine = engine
        self.served_name = served_name
        self.report = report
        self.identity_for_base = identity_for_base
        self.max_jobs = max_jobs
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vllm-job")
        self._http = httpx.Client(timeout=httpx.Timeout(read_timeout_s, connect=5.0),
                                  limits=httpx.Limits(max_connections=workers + 8))
        self._lock = threading.Lock()
        self._pending = 0
        self._closed: str | None = None
        self.stats = {"vllm_jobs": 0, "vllm_failures": 0}

    # ---- lifecycle (engine/samplers.py `Sampler`) ------------------------------------------

    def start(self) -> None:
        """Start vLLM (blocks until it is healthy) and register what base rows run as."""
        self.process.on_restart = self._restarted
        self.process.start()
        self._register_identity()

    def health(self) -> dict[str, Any]:
        return {**self.process.health(), "backend": "vllm", "identity_for_base": self.identity_for_base}

    def _restarted(self) -> None:
        self._register_identity()
        self.residency.reregister()

    def _register_identity(self) -> None:
        if self.identity_for_base:
            folder = self.residency.folders.write_identity(self.engine.info)
            self.residency.client.load_adapter(IDENTITY, folder)

    @property
    def base_model(self) -> str:
        """The vLLM model name base-model rows are sent as (see the CPU defect above)."""
        return IDENTITY if self.identity_for_base else self.served_name

    # ---- any thread -----------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closed is not None:
                raise NoCapacity(self._closed)
            if self._pending >= self.max_jobs:
                raise NoCapacity(f"the sample queue is full ({self.max_jobs} jobs); retry shortly")
            self._pending += 1
        self._pool.submit(self._run, job)

    def drain(self, reason: str) -> None:
        with self._lock:
            self._closed = reason

    def stop(self) -> None:
        self.drain("the server is shutting down")
        self.process.stop()  # open streams end with a transport error: Unavailable
        self._pool.shutdown(wait=False, cancel_futures=True)  # running jobs end with the stream
        self._http.close()
        self.residency.client.close()

    # ---- worker threads -------------------------------------------------------------------

    def _run(self, job: Job) -> None:
        lease = job.payload.lease  # type: ignore[union-attr]
        try:
            outcome: Any = self._sample(job)
        except httpx.TransportError as e:  # vLLM died or restarted under us
            outcome = Unavailable(f"the vLLM sampler went away mid-request ({type(e).__name__}); retry shortly",
                                  retry_after_s=5.0)
        except Exception as e:
            outcome = e
        finally:
            if lease is not None:
                lease.release()
            with self._lock:
                self._pending -= 1
                self.stats["vllm_jobs"] += 1
                self.stats["vllm_failures"] += isinstance(outcome, Exception)
        self.report(job, outcome)

    def _sample(self, job: Job) -> list[SampleResult]:
        p = job.payload
        if self._closed is not None:
            raise NoCapacity(self._closed)
        if job.cancelled:
            raise Cancelled("the client went away")
        model = self.base_model
        if p.lease is not None:  # type: ignore[union-attr]
            p.lease.loaded.result()  # type: ignore[union-attr]  # the cold load (errors are the job's)
            self.residency.activate_pinned(p.lease.key)  # type: ignore[union-attr]
            p.lease._slot = True  # type: ignore[union-attr]  # released (unpinned) with the lease
            model = self.residency.lora_name(p.lease.key)  # type: ignore[union-attr]
        for r in p.requests:  # type: ignore[union-attr]
            self.engine.validate_sample(r)
        return [self._one(job, i, r, model) for i, r in enumerate(p.requests)]  # type: ignore[union-attr]

    def _one(self, job: Job, index: int, req: SampleRequest, model: str) -> SampleResult:
        if req.record_routes:
            raise InvalidRequest("record_routes is not available with --sampler vllm")
        url = self.process.url + "/v1/completions"
        if req.prompt_logprobs:
            return self._whole(job, index, req, model, url)
        tokens: list[list[int]] = [[] for _ in range(req.num_samples)]
        logprobs: list[list[float]] = [[] for _ in range(req.num_samples)]
        reasons: list[str] = ["length"] * req.num_samples
        with self._http.stream("POST", url, json=completion_body(model, req, stream=True)) as resp:
            if resp.status_code != 200:
                raise _error(resp.status_code, resp.read().decode(errors="replace"))
            for line in resp.iter_lines():
                if job.cancelled:
                    raise Cancelled("the client went away")  # closing the stream aborts it in vLLM
                if self._closed is not None:
                    raise NoCapacity(self._closed)  # shutdown: open streams end now
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise _error(int(chunk["error"].get("code") or 500), chunk["error"].get("message", ""))
                for choice in chunk.get("choices", []):
                    s = choice["index"]
                    ids = choice.get("token_ids") or []
                    lps = (choice.get("logprobs") or {}).get("token_logprobs") or []
                    for t, lp in zip(ids, lps, strict=False):
                        tokens[s].append(int(t))
                        logprobs[s].append(float(lp))
                        self._on_token(job, index, s, int(t), float(lp))
                    if choice.get("finish_reason"):
                        reasons[s] = _STOP.get(choice["finish_reason"], "stop")
        return SampleResult([SampledSequence(t, lp, reasons[s])  # type: ignore[arg-type]
                             for s, (t, lp) in enumerate(zip(tokens, logprobs, strict=True))])

    def _whole(self, job: Job, index: int, req: SampleRequest, model: str, url: str) -> SampleResult:
        resp = self._http.post(url, json=completion_body(model, req, stream=False))
        if resp.status_code != 200:
            raise _error(resp.status_code, resp.text)
        choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
        seqs = []
        for c in choices:
            ids = [int(t) for t in c.get("token_ids") or []]
            lps = [float(x) for x in (c.get("logprobs") or {}).get("token_logprobs") or []]
            for t, lp in zip(ids, lps, strict=False):
                self._on_token(job, index, c["index"], t, lp)
            seqs.append(SampledSequence(ids, lps, _STOP.get(c.get("finish_reason") or "", "stop")))  # type: ignore[arg-type]
        prompt_lps: list[float | None] = []
        for pos, entry in enumerate(choices[0].get("prompt_logprobs") or []):
            if entry is None:
                prompt_lps.append(None)
            else:
                got = entry.get(str(req.prompt[pos]))
                prompt_lps.append(None if got is None else float(got["logprob"]))
        return SampleResult(seqs, prompt_lps)

    def _on_token(self, job: Job, request: int, sample: int, token: int, logprob: float) -> None:
        if job.cancelled:
            return
        try:
            job.sink.on_token(job, request, sample, token, logprob)
        except Exception:  # a streaming client's callback failed: its request ends, nobody else's
            log.exception("on_token failed; cancelling the job")
            job.cancel()


def _error(status: int, text: str) -> Exception:
    """A vLLM error response as a lorafleet error (its 4xx are the request's fault)."""
    if status in (502, 503, 504):
        return Unavailable(f"the vLLM sampler is unavailable ({status}); retry shortly", retry_after_s=5.0)
    if 400 <= status < 500:
        try:
            text = json.loads(text).get("error", {}).get("message", text)
        except (ValueError, AttributeError):
            pass
        return InvalidRequest(f"vLLM refused the request: {text}")
    return RuntimeError(f"vLLM answered {status}: {text[:500]}")


__all__ = ["VllmSampler", "completion_body"]
