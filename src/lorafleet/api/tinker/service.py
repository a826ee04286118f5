"""The Tinker service: validates requests, records them, and hands work to the runners.

Called by the thin HTTP routes in `routes.py`; returns plain dicts (the JSON answers) and
raises `lorafleet.errors` types. Never touches the engine or tensors: compute goes to a
`Runner` as an `Op` and comes back through a future.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from lorafleet.api.runner import FWDBWD, Op, Runner
from lorafleet.api.tinker import schemas as s
from lorafleet.api.tinker import wire
from lorafleet.api.tinker.checkpoints import (
    META_NAME,
    Checkpoints,
    TinkerPath,
    check_name,
    parse_path,
)
from lorafleet.api.tinker.futures import FutureTable
from lorafleet.api.tinker.store import TinkerStore, now
from lorafleet.errors import (
    BadTokens,
    Conflict,
    Expired,
    InvalidRequest,
    MissingLossInput,
    NotFound,
    UnknownBaseModel,
)
from lorafleet.lora.spec import ATTN_MODULES, MLP_MODULES, LoraSpec

log = logging.getLogger("lorafleet.tinker")

SAFE_CLIENT_CONFIG = {
    "pjwt_auth_enabled": False,
    "sample_use_retrieve_futures": False,
    "sample_join_sampling_session": False,
    "custom_loss_server_side": False,
    "proto_compress_fwdbwd": False,
    "use_pyqwest_transport": True,
    "parallel_fwdbwd_chunks": True,
    "fwdbwd_max_chunk_len": 1024,
    "sample_max_concurrent_requests": 256,
}
LORA_ALPHA = 32.0  # what the official service uses (reference/tinker_protocol.md §6.1)
MAX_SAMPLES = 128
DEFAULT_MAX_TOKENS = 256


@dataclass(slots=True)
class Submitted:
    """The answer to a compute call: the future's id (plus sequence ids for samples)."""

    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"request_id": self.request_id}
        if self.model_id is not None:
            out["model_id"] = self.model_id
        if self.sample_sequence_ids is not None:
            out["sample_sequence_ids"] = self.sample_sequence_ids
        return out


class TinkerService:
    """Everything behind /api/v1, independent of HTTP."""

    def __init__(
        self,
        runners: dict[str, Runner],
        store: TinkerStore,
        futures: FutureTable,
        checkpoints: Checkpoints,
        catalog: Any = None,
    ) -> None:
        self.catalog = catalog  # CatalogBridge or None
        self.runners = runners
        self.store = store
        self.futures = futures
        self.checkpoints = checkpoints

    # ------------------------------------------------------------------ helpers

    def runner(self, base_model: str) -> Runner:
        r = self.runners.get(base_model)
        if r is None:
            raise UnknownBaseModel(
                f"base model {base_model!r} is not served here; loaded: {sorted(self.runners)}"
            )
        return r

    def run_row(self, tenant: str, model_id: str) -> dict[str, Any]:
        row = self.store.get("runs", "model_id", model_id)
        if row is None or row["tenant"] != tenant:
            raise NotFound(f"training run {model_id} not found")
        return row

    def live_run(self, tenant: str, model_id: str) -> tuple[dict[str, Any], Runner]:
        row = self.run_row(tenant, model_id)
        runner = self.runner(row["base_model"])
        if not runner.knows_model(model_id):
            raise NotFound(
                f"training run {model_id} is not loaded (the server restarted or its session "
                "ended); create a training client from one of its checkpoints"
            )
        return row, runner

    def session_row(self, tenant: str, session_id: str) -> dict[str, Any]:
        row = self.store.get("sessions", "session_id", session_id)
        if row is None or row["tenant"] != tenant:
            raise NotFound(f"session {session_id} not found")
        return row

    def find_checkpoint(self, tenant: str, path: TinkerPath) -> dict[str, Any]:
        """A checkpoint row: from this server, or else from the shared catalog (a checkpoint
        another lorafleet server published), copied into the local checkpoint folders."""
        try:
            return self.checkpoints.find(tenant, path)
        except NotFound:
            found = self.catalog.fetch(tenant, path) if self.catalog is not None else None
            if found is None:
                raise
        owner, base_model, files = found
        meta = json.loads(files.pop(META_NAME, b"{}") or b"{}")
        meta.setdefault("base_model", base_model)
        meta.setdefault("lora_flags", _flags_from_files(files))
        try:
            self.checkpoints.write(owner, path, files, meta)
            if owner != tenant:  # the catalog let a non-owner see it: it is published
                self.checkpoints.set_public(owner, str(path), True)
        except Conflict:  # a concurrent request copied it first
            pass
        return self.checkpoints.find(tenant, path)

    def _enqueue(self, runner: Runner, op: Op, fingerprint: str, scope: str | None,
                 seq_id: int | None, idem: str | None) -> Submitted:
        request_id, created = self.futures.submit(op.tenant, op.kind, fingerprint, scope, seq_id, idem)
        if created:
            op.request_id = request_id
            try:
                runner.submit(op)
            except Exception:
                self.futures.forget(request_id)
                raise
        return Submitted(request_id, model_id=op.model_id)

    # ------------------------------------------------------------------ sessions

    def create_session(self, tenant: str, req: s.CreateSessionRequest) -> dict[str, Any]:
        session_id = f"s-{uuid.uuid4().hex[:16]}"
        t = now()
        self.store.insert("sessions", {
            "session_id": session_id, "tenant": tenant, "created": t, "last_heartbeat": t,
            "user_metadata": req.user_metadata, "display_name": req.display_name,
            "tags": req.tags, "sdk_version": req.sdk_version,
        })
        return {"session_id": session_id, "type": "create_session"}

    def heartbeat(self, tenant: str, session_id: str) -> dict[str, Any]:
        row = self.session_row(tenant, session_id)
        if row["finished"]:
            raise Expired(f"session {session_id} is finished")
        self.store.update("sessions", "session_id", session_id, last_heartbeat=now())
        return {"type": "session_heartbeat"}

    def finish_session(self, tenant: str, session_id: str, reason: str) -> None:
        """The client closed its ServiceClient: free the session's adapters in the engines."""
        self.session_row(tenant, session_id)
        self.store.update("sessions", "session_id", session_id, finished=reason or "success")
        self._unload_session(session_id, f"session {session_id} finished")

    def _unload_session(self, session_id: str, reason: str) -> None:
        for row in self.store.select("SELECT * FROM runs WHERE session_id = ?", session_id):
            runner = self.runners.get(row["base_model"])
            if runner is not None and runner.knows_model(row["model_id"]):
                runner.submit(Op("", "unload", row["tenant"],
                                 {"model_id": row["model_id"], "reason": reason}))

    def expire_sessions(self, timeout_s: float) -> int:
        """End sessions whose heartbeats stopped (the SDK sends one every 10 s)."""
        rows = self.store.select(
            "SELECT session_id FROM sessions WHERE finished IS NULL AND last_heartbeat < ?",
            now() - timeout_s,
        )
        for row in rows:
            self.store.update("sessions", "session_id", row["session_id"], finished="expired")
            self._unload_session(row["session_id"], "its heartbeats stopped")
        return len(rows)

    # ------------------------------------------------------------------ models

    def create_model(self, tenant: str, req: s.CreateModelRequest, idem: str | None) -> Submitted:
        self.session_row(tenant, req.session_id)
        runner = self.runner(req.base_model)
        lora = req.lora_config or s.LoraConfig()
        targets = (ATTN_MODULES if lora.train_attn else ()) + (MLP_MODULES if lora.train_mlp else ())
        targets = tuple(m for m in targets if m in runner.base.info.lora_modules)
        if not targets:
            raise InvalidRequest("train_attn and train_mlp are both false: nothing to train")
        spec = LoraSpec(rank=lora.rank, alpha=LORA_ALPHA, target_modules=targets)
        flags = {"rank": lora.rank, "train_attn": lora.train_attn, "train_mlp": lora.train_mlp,
                 "train_unembed": False, "requested_train_unembed": lora.train_unembed,
                 "target_modules": list(spec.target_modules), "lora_alpha": LORA_ALPHA}
        model_id = f"{req.session_id}:train:{req.model_seq_id}"
        fingerprint = s.CreateModelRequest.model_dump_json(req)
        request_id, created = self.futures.submit(
            tenant, "create_model", fingerprint, f"{req.session_id}:models", req.model_seq_id, idem
        )
        if created:
            self._insert_run(tenant, req.session_id, model_id, req.base_model, flags, req.user_metadata)
            runner.submit(Op(request_id, "create_model", tenant, {
                "model_id": model_id, "spec": spec, "seed": lora.seed, "lora_flags": flags,
                "user_metadata": req.user_metadata,
            }, model_id=model_id))
        return Submitted(request_id, model_id=model_id)

    def _insert_run(self, tenant, session_id, model_id, base, flags, user_metadata) -> None:
        if self.store.get("runs", "model_id", model_id) is not None:
            raise Conflict(f"training run {model_id} already exists")
        t = now()
        self.store.insert("runs", {
            "model_id": model_id, "tenant": tenant, "session_id": session_id,
            "base_model": base, "lora": flags,
            "user_metadata": {k: str(v) for k, v in (user_metadata or {}).items()},
            "created": t, "last_request": t,
        })

    def get_info(self, tenant: str, model_id: str) -> dict[str, Any]:
        row = self.run_row(tenant, model_id)
        runner = self.runner(row["base_model"])
        base = runner.base
        return {
            "type": "get_info",
            "model_id": model_id,
            "model_data": {"arch": base.info.arch, "model_name": base.name,
                           "tokenizer_id": str(base.tokenizer_dir)},
            "is_lora": True,
            "lora_rank": row["lora"]["rank"],
            "model_name": base.name,
            "optimizer_config": {"type": "adamw"},
        }

    # ------------------------------------------------------------------ training

    def forward_backward(self, tenant: str, call: wire.FwdBwdCall, idem: str | None) -> Submitted:
        row, runner = self.live_run(tenant, call.model_id)
        self._check_loss(call, runner)
        if call.seq_id <= 0:
            raise InvalidRequest("seq_id must be >= 1")
        op = Op("", FWDBWD, tenant, call, model_id=call.model_id, seq_id=call.seq_id)
        self._touch(call.model_id)
        return self._enqueue(runner, op, call.fingerprint, call.model_id, call.seq_id, idem)

    def _check_loss(self, call: wire.FwdBwdCall, runner: Runner) -> None:
        """Refuse at submit what would fail in the engine: unknown loss, inputs, token ids."""
        import torch

        from lorafleet.train import losses

        call.loss_config = losses.resolve_config(call.loss_fn, call.loss_config)
        vocab = runner.base.info.vocab_size
        for i, d in enumerate(call.data):
            inputs = {k: torch.from_numpy(v) for k, v in d.inputs.items()}
            try:
                losses.check_inputs(call.loss_fn, d.tokens.size, inputs)
            except MissingLossInput as e:
                raise MissingLossInput(f"data[{i}]: {e}") from e
            for name, toks in (("model_input", d.tokens), ("target_tokens", d.inputs.get("target_tokens"))):
                if toks is not None and toks.size and (toks.max() >= vocab or toks.min() < 0):
                    raise BadTokens(
                        f"data[{i}].{name}: token id {int(toks.max())} is outside the vocabulary "
                        f"(size {vocab}) of {runner.base.name}"
                    )

    def _touch(self, model_id: str) -> None:
        self.store.update("runs", "model_id", model_id, last_request=now())

    def _ordered(self, tenant: str, kind: str, model_id: str, seq_id: int | None,
                 payload: Any, fingerprint: str, idem: str | None) -> Submitted:
        _, runner = self.live_run(tenant, model_id)
        if seq_id is None or seq_id <= 0:
            raise InvalidRequest("seq_id must be >= 1")
        self._touch(model_id)
        op = Op("", kind, tenant, payload, model_id=model_id, seq_id=seq_id)
        return self._enqueue(runner, op, fingerprint, model_id, seq_id, idem)

    def optim_step(self, tenant: str, req: s.OptimStepRequest, idem: str | None) -> Submitted:
        if req.optimizer_params is not None and req.adam_params is None:
            raise InvalidRequest(
                f"optimizer {req.optimizer_params.get('type')!r} is not supported; use AdamParams"
            )
        adam = (req.adam_params or s.AdamParams()).model_dump()
        if adam["learning_rate"] < 0 or not 0 <= adam["beta1"] < 1 or not 0 <= adam["beta2"] < 1:
            raise InvalidRequest(f"invalid AdamParams {adam}")
        return self._ordered(tenant, "optim_step", req.model_id, req.seq_id, adam,
                             req.model_dump_json(), idem)

    def save_weights(self, tenant: str, req: s.SaveWeightsRequest, idem: str | None) -> Submitted:
        name = check_name(req.path or f"step-{req.seq_id or 0:06d}")
        path = TinkerPath(req.model_id, "training", name)
        self._refuse_existing(tenant, path, req.model_dump_json(), req.model_id, req.seq_id)
        payload = {"name": name, "ttl_seconds": req.ttl_seconds, "user_metadata": req.user_metadata}
        return self._ordered(tenant, "save_weights", req.model_id, req.seq_id, payload,
                             req.model_dump_json(), idem)

    def _refuse_existing(self, tenant, path, fingerprint, model_id, seq_id) -> None:
        if self.checkpoints.exists(path):
            dup = self.store.select(
                "SELECT fingerprint FROM futures WHERE scope = ? AND seq_id = ?", model_id, seq_id
            )
            if not dup or dup[0]["fingerprint"] != fingerprint:
                raise Conflict(f"checkpoint {path} already exists; checkpoints are immutable")

    def save_weights_for_sampler(
        self, tenant: str, req: s.SaveWeightsForSamplerRequest, idem: str | None
    ) -> Submitted:
        row = self.run_row(tenant, req.model_id)
        payload: dict[str, Any] = {"ttl_seconds": req.ttl_seconds, "user_metadata": req.user_metadata}
        if req.path:
            payload["name"] = check_name(req.path)
            path = TinkerPath(req.model_id, "sampler", payload["name"])
            self._refuse_existing(tenant, path, req.model_dump_json(), req.model_id, req.seq_id)
        else:
            n = req.sampling_session_seq_id
            sampler_id = f"{row['session_id']}:sample:{n}" if n is not None else (
                f"{row['session_id']}:sample:e{uuid.uuid4().hex[:8]}")
            payload["sampler_id"] = sampler_id
        sub = self._ordered(tenant, "save_weights_for_sampler", req.model_id, req.seq_id,
                            payload, req.model_dump_json(), idem)
        if "sampler_id" in payload and self.store.get("samplers", "sampler_id", payload["sampler_id"]) is None:
            self.store.insert("samplers", {
                "sampler_id": payload["sampler_id"], "tenant": tenant,
                "session_id": row["session_id"], "base_model": row["base_model"],
                "model_path": None, "source_model_id": req.model_id, "created": now(),
            })
        return sub

    def save_weights_external(
        self, tenant: str, req: s.SaveWeightsExternalRequest, idem: str | None
    ) -> Submitted:
        if req.age_encryption_recipients:
            raise InvalidRequest(
                "age-encrypted exports are not supported by lorafleet; omit "
                "age_encryption_recipients (the URLs are served by this server over your network)"
            )
        name = check_name(req.path or f"export-{req.seq_id or 0:06d}")
        path = TinkerPath(req.model_id, "external", name)
        self._refuse_existing(tenant, path, req.model_dump_json(), req.model_id, req.seq_id)
        payload = {"name": name, "ttl_seconds": req.ttl_seconds, "user_metadata": req.user_metadata}
        return self._ordered(tenant, "save_weights_external", req.model_id, req.seq_id, payload,
                             req.model_dump_json(), idem)

    def load_weights(self, tenant: str, req: s.LoadWeightsRequest, idem: str | None) -> Submitted:
        ckpt = self.find_checkpoint(tenant, parse_path(req.path))
        if req.optimizer and ckpt["kind"] != "training":
            raise InvalidRequest(f"{req.path} holds no optimizer state; load a weights/ checkpoint")
        payload = {"row": ckpt, "optimizer": req.optimizer}
        fingerprint = req.model_dump_json()
        if req.model_id:  # legacy: load into an existing run, in sequence
            return self._ordered(tenant, "load_weights", req.model_id, req.seq_id, payload,
                                 fingerprint, idem)
        if req.session_id is None or req.model_seq_id is None:
            raise InvalidRequest("load_weights needs model_id, or session_id and model_seq_id")
        self.session_row(tenant, req.session_id)
        meta = ckpt.get("meta") or {}
        base = meta.get("base_model") or req.base_model or ""
        runner = self.runner(base)
        model_id = f"{req.session_id}:train:{req.model_seq_id}"
        request_id, created = self.futures.submit(
            tenant, "load_create", fingerprint, f"{req.session_id}:models", req.model_seq_id, idem
        )
        if created:
            self._insert_run(tenant, req.session_id, model_id, base, meta.get("lora_flags") or
                             {"rank": 0}, req.user_metadata or self._source_metadata(ckpt))
            payload["model_id"] = model_id
            payload["user_metadata"] = req.user_metadata or self._source_metadata(ckpt)
            runner.submit(Op(request_id, "load_create", tenant, payload, model_id=model_id))
        return Submitted(request_id, model_id=model_id)

    def _source_metadata(self, ckpt: dict[str, Any]) -> dict[str, Any] | None:
        src = self.store.get("runs", "model_id", ckpt["model_id"])
        return src["user_metadata"] if src else None

    # ------------------------------------------------------------------ sampling

    def create_sampling_session(self, tenant: str, req: s.CreateSamplingSessionRequest) -> dict[str, Any]:
        self.session_row(tenant, req.session_id)
        sampler_id = f"{req.session_id}:sample:{req.sampling_session_seq_id}"
        if req.model_path:
            ckpt = self.find_checkpoint(tenant, parse_path(req.model_path))
            base = (ckpt.get("meta") or {}).get("base_model", "")
            self.runner(base)
        elif req.base_model:
            base = req.base_model
            self.runner(base)
        else:
            raise InvalidRequest("create_sampling_session needs base_model or model_path")
        existing = self.store.get("samplers", "sampler_id", sampler_id)
        if existing is not None:
            if existing["tenant"] != tenant or existing["model_path"] != req.model_path:
                raise Conflict(f"sampling session {sampler_id} already exists with other weights")
        else:
            self.store.insert("samplers", {
                "sampler_id": sampler_id, "tenant": tenant, "session_id": req.session_id,
                "base_model": base, "model_path": req.model_path, "source_model_id": None,
                "created": now(),
            })
        return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}

    def get_sampler(self, tenant: str, sampler_id: str) -> dict[str, Any]:
        row = self.store.get("samplers", "sampler_id", sampler_id)
        if row is None or row["tenant"] != tenant:
            raise NotFound(f"sampler {sampler_id} not found")
        return {"sampler_id": sampler_id, "base_model": row["base_model"],
                "model_path": row["model_path"]}

    def sample(self, tenant: str, req: s.SampleRequest, idem: str | None) -> Submitted:
        key, base, ckpt, base_only = self._sampler_target(tenant, req)
        runner = self.runner(base)
        prompt = wire.model_input_tokens(req.prompt)
        payload = self._sample_payload(runner, req, prompt)
        payload.update(sampler_key=key, checkpoint=ckpt, base_only=base_only)
        scope = req.sampling_session_id if req.seq_id is not None else None
        op = Op("", "sample", tenant, payload)
        sub = self._enqueue(runner, op, req.model_dump_json(), scope and f"sample:{scope}",
                            req.seq_id, idem)
        sub.sample_sequence_ids = [f"{sub.request_id}:{i}" for i in range(req.num_samples)]
        sub.model_id = None
        return sub

    def _sampler_target(self, tenant: str, req: s.SampleRequest):
        """(sampler key, base model, checkpoint row to load or None, base-model-only?)."""
        if req.sampling_session_id:
            row = self.store.get("samplers", "sampler_id", req.sampling_session_id)
            if row is None or row["tenant"] != tenant:
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

    def _sample_payload(self, runner: Runner, req: s.SampleRequest, prompt: list[int]) -> dict[str, Any]:
        unsupported = {
            "topk_prompt_logprobs": req.topk_prompt_logprobs, "topk_sample_logprobs": req.topk_sample_logprobs,
            "prompt_alt_tokens_k": req.prompt_alt_tokens_k,
            "target_prompt_logprobs": req.target_prompt_logprobs is not None,
            "prompt_logprobs_last_n": req.prompt_logprobs_last_n is not None,
            "record_stability_info": bool(req.record_stability_info),
        }
        used = [k for k, v in unsupported.items() if v]
        if used:
            raise InvalidRequest(f"not supported by lorafleet: {used}")
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
        if sp.temperature < 0 or not 0 < sp.top_p <= 1:
            raise InvalidRequest("temperature must be >= 0 and top_p in (0, 1]")
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
        return {
            "prompt": prompt, "num_samples": req.num_samples, "prompt_logprobs": bool(req.prompt_logprobs),
            "params": {"max_tokens": max_tokens, "temperature": sp.temperature, "top_p": sp.top_p,
                       "top_k": sp.top_k, "seed": sp.seed, "stop_strings": stop_strings,
                       "stop_token_ids": stop_ids},
        }

    # ------------------------------------------------------------------ REST

    def capabilities(self) -> dict[str, Any]:
        return {"supported_models": [
            {"model_name": name, "max_context_length": r.base.info.max_context,
             "trainable": True, "sampleable": True}
            for name, r in self.runners.items()
        ]}

    def training_runs(self, tenant: str, limit: int, offset: int) -> dict[str, Any]:
        rows = self.store.select(
            "SELECT * FROM runs WHERE tenant = ? ORDER BY created DESC LIMIT ? OFFSET ?",
            tenant, limit, offset,
        )
        total = self.store.select("SELECT COUNT(*) AS n FROM runs WHERE tenant = ?", tenant)[0]["n"]
        return {"training_runs": [self._run_json(r) for r in rows],
                "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    def training_run(self, tenant: str, model_id: str) -> dict[str, Any]:
        return self._run_json(self.run_row(tenant, model_id))

    def _run_json(self, row: dict[str, Any]) -> dict[str, Any]:
        ckpts = self.checkpoints.list(row["tenant"], row["model_id"])
        last = {k: next((c for c in reversed(ckpts) if c["kind"] == k), None)
                for k in ("training", "sampler")}
        return {
            "training_run_id": row["model_id"], "base_model": row["base_model"],
            "model_owner": row["tenant"], "is_lora": True, "corrupted": bool(row["corrupted"]),
            "lora_rank": row["lora"].get("rank"),
            "last_request_time": _iso(row["last_request"]),
            "last_checkpoint": last["training"] and checkpoint_json(last["training"]),
            "last_sampler_checkpoint": last["sampler"] and checkpoint_json(last["sampler"]),
            "user_metadata": row["user_metadata"] or None,
        }

    def list_checkpoints(self, tenant: str, model_id: str | None, limit: int = 1000,
                         offset: int = 0, kinds: set[str] | None = None) -> dict[str, Any]:
        if model_id is not None:
            self.run_row(tenant, model_id)
        rows = [r for r in self.checkpoints.list(tenant, model_id)
                if kinds is None or r["kind"] in kinds]
        page = rows[offset: offset + limit]
        return {"checkpoints": [checkpoint_json(r) for r in page],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(rows)}}

    def delete_checkpoint(self, tenant: str, path: str) -> None:
        self.checkpoints.delete(tenant, path)
        if self.catalog is not None:
            self.catalog.delete(tenant, path)

    def checkpoint_path(self, model_id: str, checkpoint_id: str) -> str:
        return str(parse_path(f"tinker://{model_id}/{checkpoint_id}"))

    def weights_info(self, tenant: str, tinker_path: str) -> dict[str, Any]:
        row = self.find_checkpoint(tenant, parse_path(tinker_path))
        flags = (row.get("meta") or {}).get("lora_flags") or {}
        return {
            "base_model": (row.get("meta") or {}).get("base_model"), "is_lora": True,
            "lora_rank": flags.get("rank"), "train_unembed": False,
            "train_mlp": flags.get("train_mlp"), "train_attn": flags.get("train_attn"),
            "optimizer_config": {"type": "adamw"},
        }

    def sessions(self, tenant: str, limit: int, offset: int) -> dict[str, Any]:
        rows = self.store.select(
            "SELECT session_id FROM sessions WHERE tenant = ? ORDER BY created DESC LIMIT ? OFFSET ?",
            tenant, limit, offset,
        )
        return {"sessions": [r["session_id"] for r in rows]}

    def session(self, tenant: str, session_id: str) -> dict[str, Any]:
        row = self.session_row(tenant, session_id)
        runs = self.store.select("SELECT model_id FROM runs WHERE session_id = ?", session_id)
        samplers = self.store.select("SELECT sampler_id FROM samplers WHERE session_id = ?", session_id)
        return {"training_run_ids": [r["model_id"] for r in runs],
                "sampler_ids": [r["sampler_id"] for r in samplers],
                "user_metadata": {k: str(v) for k, v in (row["user_metadata"] or {}).items()} or None,
                "display_name": row["display_name"]}


def _flags_from_files(files: dict[str, bytes]) -> dict[str, Any]:
    config = json.loads(files.get("adapter_config.json", b"{}") or b"{}")
    targets = set(config.get("target_modules") or ())
    return {"rank": config.get("r"), "train_attn": bool(targets & set(ATTN_MODULES)),
            "train_mlp": bool(targets & set(MLP_MODULES)), "train_unembed": False,
            "target_modules": sorted(targets), "lora_alpha": config.get("lora_alpha")}


def checkpoint_json(row: dict[str, Any]) -> dict[str, Any]:
    path = parse_path(row["tinker_path"])
    return {
        "checkpoint_id": path.checkpoint_id, "checkpoint_type": row["kind"],
        "time": _iso(row["created"]), "tinker_path": row["tinker_path"],
        "size_bytes": row["size_bytes"], "public": bool(row["public"]),
        "user_metadata": row["user_metadata"],
        "expires_at": _iso(row["expires_at"]) if row["expires_at"] else None,
    }


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


def np_max(a: np.ndarray) -> int:
    return int(a.max()) if a.size else -1
