"""Sampling calls of the Tinker API: sampling sessions, samplers and `asample`.

A mixin of `TinkerService` (its state lives there). Validates sampling requests against the
base model (vocabulary, context length), takes a residency lease on the sampler's weights
(reading them back from their checkpoint when they left host memory) and queues a typed
sample job on the base's scheduler, the same fair queue OpenAI requests use.
"""

from __future__ import annotations

from typing import Any

import torch

from lorafleet.api.tinker import schemas as s
from lorafleet.api.tinker import wire
from lorafleet.api.tinker.checkpoints import parse_path
from lorafleet.api.tinker.jobs import Ticket
from lorafleet.api.tinker.repo import now
from lorafleet.api.tinker.submitted import Submitted
from lorafleet.engine.jobs import Job, Sample, WorkKind
from lorafleet.engine.logprobs import PromptScoring
from lorafleet.engine.scheduler import Scheduler
from lorafleet.engine.types import MAX_TOP_LOGPROBS, SampleRequest, SamplingParams
from lorafleet.errors import BadTokens, Conflict, InvalidRequest, NotFound
from lorafleet.lora import io as lora_io
from lorafleet.train.losses import STABILITY_INFO

MAX_SAMPLES = 128
DEFAULT_MAX_TOKENS = 256


class SamplingCalls:
    """create_sampling_session, GET samplers/{id}, asample."""

    def create_sampling_session(self, tenant: str, req: s.CreateSamplingSessionRequest) -> dict[str, Any]:
        self.session_row(tenant, req.session_id)
        sampler_id = f"{req.session_id}:sample:{req.sampling_session_seq_id}"
        if req.model_path:
            ckpt = self.find_checkpoint(tenant, parse_path(req.model_path))
            base = self.checkpoint_runner(ckpt).base.name
        elif req.base_model:
            base = req.base_model
            self.runner(base)
        else:
            raise InvalidRequest("create_sampling_session needs base_model or model_path")
        if not self.repo.insert_sampler({
                "sampler_id": sampler_id, "tenant": tenant, "session_id": req.session_id,
                "base_model": base, "model_path": req.model_path, "source_model_id": None,
                "created": now()}):
            existing = self.repo.sampler_by_id(sampler_id)
            if existing is None or existing["tenant"] != tenant or existing["model_path"] != req.model_path:
                raise Conflict(f"sampling session {sampler_id} already exists with other weights")
        return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}

    def get_sampler(self, tenant: str, sampler_id: str) -> dict[str, Any]:
        row = self.repo.sampler(tenant, sampler_id)
        if row is None:
            raise NotFound(f"sampler {sampler_id} not found")
        return {"sampler_id": sampler_id, "base_model": row["base_model"],
                "model_path": row["model_path"]}

    def sample(self, tenant: str, req: s.SampleRequest, idem: str | None) -> Submitted:
        key, base, ckpt, base_only = self._sampler_target(tenant, req)
        runner = self.runner(base)
        prompt = wire.model_input_tokens(req.prompt)
        targets = None if req.target_prompt_logprobs is None or not prompt else wire.target_ids_from_json(
            req.target_prompt_logprobs, len(prompt) - 1, runner.base.info.vocab_size)
        request = self._sample_request(runner, req, prompt, targets)
        scope = req.sampling_session_id if req.seq_id is not None else None

        def build(t: Ticket) -> Job:
            t.info["targets"] = targets  # the answer keeps the request's layout
            lease = None if base_only else runner.residency.acquire(key, self._sampler_loader(key, ckpt))
            return self.job(runner, WorkKind.SAMPLE, Sample([request], lease), tenant, t)

        sub = self._enqueue(runner, tenant, "sample", build, req.model_dump_json(),
                            scope and f"sample:{scope}", req.seq_id, idem)
        sub.sample_sequence_ids = [f"{sub.request_id}:{i}" for i in range(req.num_samples)]
        return sub

    def _sampler_loader(self, key: str, ckpt: dict[str, Any] | None):
        """Reads a sampler version back from its checkpoint when it left host memory."""
        def load():
            if ckpt is None:
                raise NotFound(f"sampler weights for {key} are no longer available")
            return lora_io.parse_peft_files(self.checkpoints.read_files(ckpt)).weights
        return load

    def _sampler_target(self, tenant: str, req: s.SampleRequest):
        """(sampler key, base model, checkpoint row to load or None, base-model-only?)."""
        if req.sampling_session_id:
            row = self.repo.sampler(tenant, req.sampling_session_id)
            if row is None:
                raise NotFound(f"sampling session {req.sampling_session_id} not found")
            if row["model_path"]:
                ckpt = self.find_checkpoint(tenant, parse_path(row["model_path"]))
                return row["model_path"], row["base_model"], ckpt, False
            if row["source_model_id"]:
                return row["sampler_id"], row["base_model"], None, False
            return f"base:{row['base_model']}", row["base_model"], None, True
        if req.model_path:
            ckpt = self.find_checkpoint(tenant, parse_path(req.model_path))
            return req.model_path, (ckpt.get("meta") or {}).get("base_model", ""), ckpt, False
        if req.base_model:
            return f"base:{req.base_model}", req.base_model, None, True
        raise InvalidRequest("asample needs sampling_session_id, model_path or base_model")

    def _sample_request(self, runner: Scheduler, req: s.SampleRequest, prompt: list[int],
                        targets: wire.TargetIds | None = None) -> SampleRequest:
        if req.record_stability_info:
            raise InvalidRequest(STABILITY_INFO)
        if req.topk_sample_logprobs > MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"topk_sample_logprobs must be at most {MAX_TOP_LOGPROBS}, "
                                 f"got {req.topk_sample_logprobs}")
        info = runner.base.info
        if not prompt:
            raise BadTokens("the prompt is empty")
        if max(prompt) >= info.vocab_size:
            raise BadTokens(f"prompt token id {max(prompt)} is outside the vocabulary ({info.vocab_size})")
        if not 1 <= req.num_samples <= MAX_SAMPLES:
            raise InvalidRequest(f"num_samples must be in 1..{MAX_SAMPLES}")
        sp = req.sampling_params
        max_tokens = DEFAULT_MAX_TOKENS if sp.max_tokens is None else sp.max_tokens
        if max_tokens < 1 and not req.prompt_logprobs:
            raise InvalidRequest("max_tokens must be >= 1")
        if len(prompt) + max_tokens > info.max_context:
            raise InvalidRequest(
                f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) exceeds the context "
                f"length {info.max_context} of {runner.base.name}"
            )
        stop_strings: tuple[str, ...] = ()
        stop_ids: tuple[int, ...] | None = None
        if isinstance(sp.stop, str):
            stop_strings = (sp.stop,)
        elif sp.stop is not None and all(isinstance(x, str) for x in sp.stop):
            stop_strings = tuple(sp.stop)  # type: ignore[arg-type]
            if not stop_strings:
                stop_ids = ()
        elif sp.stop is not None:
            stop_ids = tuple(int(x) for x in sp.stop)
            bad = [t for t in stop_ids if not 0 <= t < info.vocab_size]
            if bad:
                raise BadTokens(f"stop token ids {bad[:8]} are outside the vocabulary "
                                f"({info.vocab_size}) of {runner.base.name}")
        params = SamplingParams(max_tokens=max_tokens, temperature=sp.temperature, top_p=sp.top_p,
                                top_k=sp.top_k, seed=sp.seed, stop_strings=stop_strings,
                                stop_token_ids=stop_ids, top_logprobs=req.topk_sample_logprobs)
        scoring = _scoring(req, prompt, targets)
        return SampleRequest(None, prompt, req.num_samples, params,
                             prompt_logprobs=bool(req.prompt_logprobs) and scoring is None,
                             scoring=scoring)


MAX_TOPK = 1024  # top-k prompt logprobs / alternative draws per position, at most


def _scoring(req: s.SampleRequest, prompt: list[int], targets: wire.TargetIds | None) -> PromptScoring | None:
    """The prompt scores a Tinker request asks for beyond plain prompt logprobs (None: none),
    computed in one forward of the prompt (engine/scoring.py)."""
    if not (req.topk_prompt_logprobs or req.prompt_alt_tokens_k or req.target_prompt_logprobs is not None
            or req.prompt_logprobs_last_n is not None):
        return None
    for name, k in (("topk_prompt_logprobs", req.topk_prompt_logprobs), ("prompt_alt_tokens_k", req.prompt_alt_tokens_k)):
        if k > MAX_TOPK:
            raise InvalidRequest(f"{name} must be at most {MAX_TOPK}, got {k}")
    last_n = req.prompt_logprobs_last_n
    if last_n is not None:
        if not req.prompt_logprobs:
            raise InvalidRequest("prompt_logprobs_last_n applies to prompt logprobs; set prompt_logprobs")
        if not 1 <= last_n <= len(prompt) - 1:
            raise InvalidRequest(f"prompt_logprobs_last_n must be between 1 and len(prompt) - 1 = "
                                 f"{len(prompt) - 1}, got {last_n}")
    sp = req.sampling_params
    return PromptScoring(logprobs=bool(req.prompt_logprobs), topk=req.topk_prompt_logprobs, last_n=last_n,
                         targets=None if targets is None else torch.from_numpy(targets.ids),
                         alt_k=req.prompt_alt_tokens_k, temperature=sp.temperature, seed=sp.seed)
