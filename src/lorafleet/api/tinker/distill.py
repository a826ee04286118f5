"""MinT `forward_backward_reverse_kl`: on-policy distillation of a student run against a
reference model (a base this server serves, or a `tinker://` checkpoint of that base).

Per datum the student's sequence (`student_input`, `target_tokens`, `weights`, the student's
sampling logprobs `old_logprobs`) and the reference's view of it (`reference_input`, which may
have another prompt but ends with the same completion). The reference scores the completion
(an engine sample job with prompt logprobs, before the call returns its future); the student
then takes one forward_backward whose gradient is that of the per-token reverse KL
`sum_t w_t * (log p_s(x_t) - log p_ref(x_t))` over its own samples x_t:
`importance_sampling` with advantages `-w_t * (old_lp_t - ref_lp_t)` (ratio 1 on-policy), the
same fused engine step as every other loss. Its `loss:sum` is the KL estimate.

Alignment: student position i (of L) predicts `target_tokens[i]`; with `scored =
reference_input + [target_tokens[-1]]`, the same token is `scored[len(reference_input) - (L - 1 - i)]`.
Every weighted position must line up (the same token), or the call is refused.

Temperature: the engine's logprobs are at temperature 1; another temperature is refused.
Provenance: each call notes the reference on the run (`runs.lora["reverse_kl"]`), and the
next save's catalog revision records `loss_fn="reverse_kl"` with the reference model.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import numpy as np

from lorafleet.api.tinker import ext_schemas as x
from lorafleet.api.tinker import wire
from lorafleet.api.tinker.checkpoints import parse_path
from lorafleet.api.tinker.jobs import Ticket
from lorafleet.api.tinker.repo import now
from lorafleet.api.tinker.submitted import Submitted
from lorafleet.engine.jobs import Job, Sample, WorkKind
from lorafleet.engine.types import SampleRequest, SamplingParams, TopLogprobs
from lorafleet.errors import BadTokens, InvalidRequest, LorafleetError
from lorafleet.lora import io as lora_io

REFERENCE_TIMEOUT_S = 600.0
LOSS = "reverse_kl"  # the provenance loss_fn of distilled revisions


class _Collect:
    """A sink that hands one job's outcome to an asyncio future (the route awaits it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()

    def _set(self, value: Any) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def done(self, job: Job, result: Any) -> None:
        self.loop.call_soon_threadsafe(self._set, result)

    def failed(self, job: Job, error: Exception) -> None:
        self.loop.call_soon_threadsafe(self._set, error)

    def on_token(self, job: Job, request: int, sample: int, token: int, logprob: float,
                 top: TopLogprobs | None = None) -> None:
        pass


def _array(td: dict[str, Any] | None, where: str, n: int) -> np.ndarray:
    a = wire.tensor_data_from_json(td, where)
    if a.ndim != 1 or a.shape[0] != n:
        raise InvalidRequest(f"{where} must have shape [{n}] (one value per student position), got {list(a.shape)}")
    return a


async def reverse_kl(svc: Any, tenant: str, body: dict[str, Any], idem: str | None) -> Submitted:
    req = x.validate(x.ReverseKLRequest, body)
    _, runner = svc.live_run(tenant, req.model_id)
    if req.seq_id is None or req.seq_id <= 0:
        raise InvalidRequest("seq_id must be >= 1")
    if req.temperature != 1.0:
        raise InvalidRequest(f"temperature {req.temperature} is not supported: the engine's logprobs are "
                             "at temperature 1; sample the student at temperature 1 and pass 1.0")
    key, lease_loader = _reference(svc, tenant, req.reference_model_path, runner)
    vocab = runner.base.info.vocab_size
    data = []
    for i, d in enumerate(req.data):
        tokens = np.asarray(wire.model_input_tokens(d.student_input, f"data[{i}].student_input"), dtype=np.int64)
        ref = np.asarray(wire.model_input_tokens(d.reference_input, f"data[{i}].reference_input"), dtype=np.int64)
        n = tokens.size
        target = _array(d.target_tokens, f"data[{i}].target_tokens", n).astype(np.int64)
        weights = _array(d.weights, f"data[{i}].weights", n).astype(np.float32)
        if d.old_logprobs is None:
            raise InvalidRequest(f"data[{i}].old_logprobs is required: the student's sampling logprobs of "
                                 "target_tokens (what its sampler returned)")
        old = _array(d.old_logprobs, f"data[{i}].old_logprobs", n).astype(np.float32)
        given = None if d.reference_logprobs is None else _array(
            d.reference_logprobs, f"data[{i}].reference_logprobs", n).astype(np.float32)
        for name, toks in (("student_input", tokens), ("reference_input", ref), ("target_tokens", target)):
            if toks.size and (toks.max() >= vocab or toks.min() < 0):
                raise BadTokens(f"data[{i}].{name}: a token id is outside the vocabulary ({vocab})")
        weighted = np.nonzero(weights)[0]
        if weighted.size and given is None:
            j = ref.size - (n - 1 - weighted)
            scored = np.concatenate([ref, target[-1:]])
            if j.min() < 1 or not np.array_equal(scored[j], target[weighted]):
                raise InvalidRequest(f"data[{i}]: reference_input must end with the student's completion "
                                     "(the weighted target_tokens, up to the last one)")
        data.append((tokens, ref, target, weights, old, given))
    fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    request_id, created = svc.futures.submit(tenant, "reverse_kl", fingerprint, req.model_id, req.seq_id, idem)
    if not created:
        return Submitted(request_id, model_id=req.model_id)
    try:
        ref_lps = await _score(svc, runner, tenant, key, lease_loader, data)
        call = _call(req, data, ref_lps)
        svc._check_loss(call, runner)
        from lorafleet.api.tinker.jobs import fwdbwd_payload

        info = {"reference_model_path": req.reference_model_path, "temperature": req.temperature}
        job = svc.job(runner, WorkKind.FORWARD_BACKWARD, fwdbwd_payload(call), tenant,
                      Ticket(request_id, "reverse_kl", info), req.model_id, req.seq_id)
        runner.submit(job)
    except Exception:
        svc.futures.forget(request_id)
        raise
    svc.repo.update_run(req.model_id, last_request=now())
    return Submitted(request_id, model_id=req.model_id)


def _reference(svc: Any, tenant: str, ref: str, runner: Any) -> tuple[str | None, Any]:
    """(residency key, loader) of the reference adapter, or (None, None) for the base itself."""
    if not ref.startswith("tinker://"):
        if ref != runner.base.name:
            raise InvalidRequest(f"reference_model_path {ref!r} is neither this run's base "
                                 f"({runner.base.name}) nor a tinker:// checkpoint of it")
        return None, None
    ckpt = svc.find_checkpoint(tenant, parse_path(ref))
    if svc.checkpoint_runner(ckpt) is not runner:
        raise InvalidRequest(f"reference {ref} is an adapter of another base than the student's "
                             f"({runner.base.name})")

    def load():
        return lora_io.parse_peft_files(svc.checkpoints.read_files(ckpt)).weights

    return ref, load


async def _score(svc, runner, tenant, key, loader, data) -> list[np.ndarray]:
    """The reference's logprob of each student target (0 where unweighted), per datum."""
    need = [k for k, d in enumerate(data) if d[5] is None and np.any(d[3])]
    out = [d[5] if d[5] is not None else np.zeros(d[0].size, np.float32) for d in data]
    if not need:
        return out
    info = runner.base.info
    requests = []
    for k in need:
        scored = [int(t) for t in np.concatenate([data[k][1], data[k][2][-1:]])]
        if len(scored) + 1 > info.max_context:
            raise InvalidRequest(f"data[{k}].reference_input is longer than the context ({info.max_context})")
        requests.append(SampleRequest(None, scored, 1, SamplingParams(max_tokens=1, temperature=1.0),
                                      prompt_logprobs=True))
    lease = None if key is None else runner.residency.acquire(key, loader)
    sink = _Collect(asyncio.get_running_loop())
    try:
        runner.submit(Job(WorkKind.SAMPLE, Sample(requests, lease), sink, tenant=tenant))
    except Exception:
        if lease is not None:
            lease.release()
        raise
    results = await asyncio.wait_for(sink.future, REFERENCE_TIMEOUT_S)
    if isinstance(results, Exception):
        if isinstance(results, LorafleetError):
            raise results
        raise RuntimeError("the reference pass failed") from results
    for k, res in zip(need, results, strict=True):
        tokens, ref, target, weights, _, _ = data[k]
        plp = res.prompt_logprobs  # [None, lp(scored[1] | scored[:1]), ...]
        n = tokens.size
        for i in np.nonzero(weights)[0]:
            out[k][i] = plp[ref.size - (n - 1 - i)]
    return out


def _call(req: x.ReverseKLRequest, data, ref_lps) -> wire.FwdBwdCall:
    out = []
    for (tokens, _, target, weights, old, _), ref_lp in zip(data, ref_lps, strict=True):
        adv = (-weights * (old - ref_lp)).astype(np.float32)
        out.append(wire.WireDatum(tokens=tokens, inputs={"target_tokens": target, "logprobs": old,
                                                         "advantages": adv}))
    fingerprint = hashlib.sha256(b"".join(d.inputs["advantages"].tobytes() for d in out)).hexdigest()
    return wire.FwdBwdCall(model_id=req.model_id, seq_id=int(req.seq_id or 0), loss_fn="importance_sampling",
                           loss_config={}, forward_only=False, data=out, fingerprint=fingerprint)
