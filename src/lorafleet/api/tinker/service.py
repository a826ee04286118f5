"""The Tinker service: validates requests, records them, and hands typed jobs to the engines.

Called by the thin HTTP routes in `routes.py`; returns plain dicts (the JSON answers) and
raises `lorafleet.errors` types. Never calls the engine: compute goes to the base's engine
`Scheduler` as a typed `Job` (engine/jobs.py) and comes back through `TinkerSink` into a
future (api/tinker/jobs.py). Checkpoints to load are read and parsed here, so the engine only
sees tensors. (Loss inputs are wrapped zero-copy as tensors only to reuse the engine's own
input checks, so bad input is refused before it is queued.)
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from lorafleet.api.tinker import schemas as s
from lorafleet.api.tinker import encryption, wire
from lorafleet.api.tinker.catalog_bridge import inherited_metadata, run_policy_name
from lorafleet.api.tinker.checkpoints import (
    OPTIMIZER_NAME,
    TinkerPath,
    check_name,
    parse_path,
)
from lorafleet.api.tinker.jobs import Ticket, TinkerSink, fwdbwd_payload
from lorafleet.api.tinker.rest import RestQueries
from lorafleet.api.tinker.run_metrics import RunMetrics
from lorafleet.api.tinker.state import TinkerState
from lorafleet.api.tinker.submitted import Submitted
from lorafleet.api.tinker.sampling import SamplingCalls
from lorafleet.api.tinker.repo import now
from lorafleet.engine.jobs import (
    CreateRun,
    Job,
    LoadRun,
    LoadWeights,
    OptimStep,
    Payload,
    Save,
    UnloadRun,
    WorkKind,
)
from lorafleet.engine.scheduler import Scheduler
from lorafleet.errors import (
    BadTokens,
    Conflict,
    Expired,
    InvalidRequest,
    MissingLossInput,
    NotFound,
    QuotaExceeded,
    UnknownBaseModel,
)
from lorafleet.lora import io as lora_io
from lorafleet.catalog.records import Quotas
from lorafleet.lora.spec import ATTN_MODULES, MLP_MODULES, UNEMBED_MODULES, LoraSpec
from lorafleet.model.registry import check_base_digest
from lorafleet.train.types import AdamParams

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


class TinkerService(SamplingCalls, RestQueries):
    """Everything behind /api/v1, independent of HTTP."""

    def __init__(
        self,
        runners: dict[str, Scheduler],
        state: TinkerState,
        catalog: Any = None,
        quotas: Callable[[str], Quotas] = lambda tenant: Quotas(),
    ) -> None:
        self.catalog = catalog  # CatalogBridge or None
        self.quotas = quotas  # a tenant's limits in force (catalog/records.py Quotas)
        state.futures.queue_limit = lambda tenant: quotas(tenant).max_queued
        self.runners = runners  # base name -> the engine scheduler of that base
        self.state = state  # rows in the catalog's database, blobs in its store (api/tinker/state.py)
        self.repo, futures, checkpoints = state.repo, state.futures, state.checkpoints
        self.futures = futures
        self.checkpoints = checkpoints
        self.sinks = {name: TinkerSink(futures, self.repo, checkpoints, r.base, r, catalog)
                      for name, r in runners.items()}
        self.run_metrics = RunMetrics(self.repo)  # per-step loss curves for the console
        futures.observers.append(self.run_metrics.done)

    def close(self) -> None:
        """Release this server's liveness lock: its unfinished futures now fail elsewhere."""
        self.state.close()

    # ------------------------------------------------------------------ helpers

    def runner(self, base_model: str) -> Scheduler:
        r = self.runners.get(base_model)
        if r is None:
            raise UnknownBaseModel(
                f"base model {base_model!r} is not served here; loaded: {sorted(self.runners)}"
            )
        return r

    def checkpoint_runner(self, ckpt: dict[str, Any], default_base: str | None = None) -> Scheduler:
        """The runner of a checkpoint's base; refused when the checkpoint was trained on other
        weights published under the same base name (its recorded digest differs)."""
        meta = ckpt.get("meta") or {}
        runner = self.runner(meta.get("base_model") or default_base or "")
        check_base_digest(runner.base, meta.get("base_digest"), ckpt.get("tinker_path", "the checkpoint"))
        return runner

    def run_row(self, tenant: str, model_id: str) -> dict[str, Any]:
        row = self.repo.run(tenant, model_id)
        if row is None:
            raise NotFound(f"training run {model_id} not found")
        return row

    def live_run(self, tenant: str, model_id: str) -> tuple[dict[str, Any], Scheduler]:
        row = self.run_row(tenant, model_id)
        runner = self.runner(row["base_model"])
        if not runner.knows_run(model_id):
            raise NotFound(
                f"training run {model_id} is not loaded on this server (the server restarted, its "
                "session ended, or it lives on another server); create a training client from "
                "one of its checkpoints"
            )
        return row, runner

    def session_row(self, tenant: str, session_id: str) -> dict[str, Any]:
        row = self.repo.session(tenant, session_id)
        if row is None:
            raise NotFound(f"session {session_id} not found")
        return row

    def find_checkpoint(self, tenant: str, path: TinkerPath) -> dict[str, Any]:
        """A checkpoint row, or else a catalog revision with this path that has none (published
        before the Tinker state moved into the catalog), recorded as a checkpoint over the
        same blobs (no copy)."""
        try:
            return self.checkpoints.find(tenant, path)
        except NotFound:
            found = self.catalog.fetch(tenant, path) if self.catalog is not None else None
            if found is None:
                raise
        meta = {"base_model": found.base_model, "base_digest": found.base_digest,
                "lora_flags": _flags_from_config(found.adapter_config), "revision_id": found.revision_id}
        # the catalog let a non-owner see it: it is published
        self.checkpoints.adopt(found.owner, path, found.files, meta, public=found.owner != tenant,
                               revision_id=found.revision_id)
        return self.checkpoints.find(tenant, path)

    def job(self, runner: Scheduler, kind: WorkKind, payload: Payload, tenant: str, ticket: Ticket,
            run_id: str | None = None, seq_id: int | None = None) -> Job:
        sink = self.sinks[runner.base.name]
        return Job(kind, payload, sink, run_id=run_id, seq_id=seq_id, tenant=tenant, tag=ticket)

    def _enqueue(self, runner: Scheduler, tenant: str, call: str, build: Callable[[Ticket], Job],
                 fingerprint: str, scope: str | None, seq_id: int | None, idem: str | None,
                 model_id: str | None = None) -> Submitted:
        """Record the future (idempotent), then build and queue the job once, for a new one."""
        request_id, created = self.futures.submit(tenant, call, fingerprint, scope, seq_id, idem)
        if created:
            job = None
            try:
                job = build(Ticket(request_id, call))
                self.run_metrics.watch(request_id, job)
                runner.submit(job)
            except Exception:
                self.run_metrics.forget(request_id)
                self.futures.forget(request_id)
                lease = getattr(job.payload, "lease", None) if job is not None else None
                if lease is not None:
                    lease.release()
                raise
        return Submitted(request_id, model_id=model_id)

    # ------------------------------------------------------------------ sessions

    def create_session(self, tenant: str, req: s.CreateSessionRequest) -> dict[str, Any]:
        session_id = f"s-{uuid.uuid4().hex[:16]}"
        t = now()
        self.repo.insert_session({
            "session_id": session_id, "tenant": tenant, "created": t, "last_heartbeat": t,
            "user_metadata": req.user_metadata, "display_name": req.display_name,
            "tags": req.tags, "sdk_version": req.sdk_version, "project_id": req.project_id,
        })
        return {"session_id": session_id, "type": "create_session"}

    def heartbeat(self, tenant: str, session_id: str) -> dict[str, Any]:
        row = self.session_row(tenant, session_id)
        if row["finished"]:
            raise Expired(f"session {session_id} is finished")
        self.repo.touch_session(session_id)
        return {"type": "session_heartbeat"}

    def finish_session(self, tenant: str, session_id: str, reason: str) -> None:
        """The client closed its ServiceClient: free the session's adapters in the engines."""
        self.session_row(tenant, session_id)
        self.repo.finish_session(session_id, reason or "success")
        self._unload_session(session_id, f"session {session_id} finished")

    def _unload_session(self, session_id: str, reason: str) -> None:
        for row in self.repo.runs_of_session(session_id):
            self._unload(row["base_model"], row["model_id"], row["tenant"], reason)

    def _unload(self, base_model: str, model_id: str, tenant: str, reason: str) -> None:
        runner = self.runners.get(base_model)
        if runner is not None and runner.knows_run(model_id):
            runner.submit(self.job(runner, WorkKind.UNLOAD_RUN, UnloadRun(reason), tenant,
                                   Ticket("", "unload"), run_id=model_id))

    def expire_sessions(self, timeout_s: float) -> int:
        """End sessions whose heartbeats stopped (the SDK sends one every 10 s), and free the
        runs loaded here whose session ended through another server sharing this state."""
        silent = self.repo.silent_sessions(now() - timeout_s)
        for session_id in silent:
            self.repo.finish_session(session_id, "expired")
            self._unload_session(session_id, "its heartbeats stopped")
        for runner in self.runners.values():
            for model_id in self.repo.finished_runs(list(runner.runs)):
                row = self.repo.run_by_id(model_id)
                if row is not None:
                    self._unload(row["base_model"], model_id, row["tenant"], "its session finished")
        return len(silent)

    # ------------------------------------------------------------------ models

    def create_model(self, tenant: str, req: s.CreateModelRequest, idem: str | None) -> Submitted:
        self.session_row(tenant, req.session_id)
        check_optimizer(req.optimizer_config)
        runner = self.runner(req.base_model)
        lora = req.lora_config or s.LoraConfig()
        targets = (ATTN_MODULES if lora.train_attn else ()) + (MLP_MODULES if lora.train_mlp else ())
        targets = tuple(m for m in targets if m in runner.base.info.lora_modules)
        if lora.train_unembed:  # LoRA on the LM head too (the cookbook's default)
            if not runner.base.info.unembed:
                raise InvalidRequest(f"train_unembed: {runner.base.name} has no separate LM head to "
                                     "put a LoRA on; pass train_unembed=False")
            targets += runner.base.info.unembed
        if not targets:
            raise InvalidRequest("train_attn, train_mlp and train_unembed are all false: nothing to train")
        spec = LoraSpec(rank=lora.rank, alpha=LORA_ALPHA, target_modules=targets)
        flags = {"rank": lora.rank, "train_attn": lora.train_attn, "train_mlp": lora.train_mlp,
                 "train_unembed": lora.train_unembed,
                 "target_modules": list(spec.target_modules), "lora_alpha": LORA_ALPHA}
        model_id = f"{req.session_id}:train:{req.model_seq_id}"
        run_policy_name(tenant, model_id, req.user_metadata)  # a bad name is a 400 now
        if self.repo.run_by_id(model_id) is None:
            self._check_runs_quota(tenant)
        fingerprint = s.CreateModelRequest.model_dump_json(req)
        request_id, created = self.futures.submit(
            tenant, "create_model", fingerprint, f"{req.session_id}:models", req.model_seq_id, idem
        )
        if created:
            self._insert_run(tenant, req.session_id, model_id, req.base_model, flags, req.user_metadata)
            ticket = Ticket(request_id, "create_model", {"spec": spec, "user_metadata": req.user_metadata})
            runner.submit(self.job(runner, WorkKind.CREATE_RUN, CreateRun(spec, lora.seed), tenant,
                                   ticket, run_id=model_id))
        return Submitted(request_id, model_id=model_id)

    def _check_runs_quota(self, tenant: str) -> None:
        limit = self.quotas(tenant).max_runs
        if limit is None:
            return
        runs = self.repo.open_runs(tenant)
        if runs >= limit:
            raise QuotaExceeded(f"quota max_runs={limit} of tenant {tenant!r} is reached: {runs} training "
                                "runs are in open sessions; finish a session or raise the quota")

    def _insert_run(self, tenant, session_id, model_id, base, flags, user_metadata) -> None:
        t = now()
        self.repo.insert_run({
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
        self._touch(call.model_id)
        return self._enqueue(
            runner, tenant, "forward_backward",
            lambda t: self.job(runner, WorkKind.FORWARD_BACKWARD, fwdbwd_payload(call), tenant, t,
                               call.model_id, call.seq_id),
            call.fingerprint, call.model_id, call.seq_id, idem, model_id=call.model_id)

    def _check_loss(self, call: wire.FwdBwdCall, runner: Scheduler) -> None:
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
        self.repo.update_run(model_id, last_request=now())

    def _ordered(self, tenant: str, call: str, kind: WorkKind, model_id: str, seq_id: int | None,
                 payload: Payload, info: dict[str, Any], fingerprint: str, idem: str | None) -> Submitted:
        _, runner = self.live_run(tenant, model_id)
        if seq_id is None or seq_id <= 0:
            raise InvalidRequest("seq_id must be >= 1")
        self._touch(model_id)

        def build(t: Ticket) -> Job:
            t.info = info
            return self.job(runner, kind, payload, tenant, t, model_id, seq_id)

        return self._enqueue(runner, tenant, call, build, fingerprint, model_id, seq_id, idem,
                             model_id=model_id)

    def optim_step(self, tenant: str, req: s.OptimStepRequest, idem: str | None) -> Submitted:
        if req.optimizer_params is not None and req.adam_params is None:
            raise InvalidRequest(
                f"optimizer {req.optimizer_params.get('type')!r} is not supported; use AdamParams"
            )
        adam = (req.adam_params or s.AdamParams()).model_dump()  # ranges checked by the schema
        return self._ordered(tenant, "optim_step", WorkKind.OPTIM_STEP, req.model_id, req.seq_id,
                             OptimStep(AdamParams(**adam)), {}, req.model_dump_json(), idem)

    def save_weights(self, tenant: str, req: s.SaveWeightsRequest, idem: str | None) -> Submitted:
        name = check_name(req.path or f"step-{req.seq_id or 0:06d}")
        path = TinkerPath(req.model_id, "training", name)
        self._refuse_existing(tenant, path, req.model_dump_json(), req.model_id, req.seq_id)
        info = {"name": name, "ttl_seconds": req.ttl_seconds, "user_metadata": req.user_metadata}
        return self._ordered(tenant, "save_weights", WorkKind.SAVE, req.model_id, req.seq_id,
                             Save(with_optimizer=True, parent=str(path)), info,
                             req.model_dump_json(), idem)

    def _refuse_existing(self, tenant, path, fingerprint, model_id, seq_id) -> None:
        """An existing checkpoint name is refused, after the run is known to be the caller's
        (another tenant's run answers 404 like a missing one, never 422 for a taken name)."""
        self.run_row(tenant, model_id)
        if self.checkpoints.exists(path):
            dup = self.repo.duplicate_future(tenant, model_id, seq_id, None)
            if dup is None or dup["fingerprint"] != fingerprint:
                raise Conflict(f"checkpoint {path} already exists; checkpoints are immutable")

    def save_weights_for_sampler(
        self, tenant: str, req: s.SaveWeightsForSamplerRequest, idem: str | None
    ) -> Submitted:
        row = self.run_row(tenant, req.model_id)
        info: dict[str, Any] = {"ttl_seconds": req.ttl_seconds, "user_metadata": req.user_metadata}
        parent = None
        if req.path:
            info["name"] = check_name(req.path)
            path = TinkerPath(req.model_id, "sampler", info["name"])
            self._refuse_existing(tenant, path, req.model_dump_json(), req.model_id, req.seq_id)
            parent = str(path)
        else:
            n = req.sampling_session_seq_id
            sampler_id = f"{row['session_id']}:sample:{n}" if n is not None else (
                f"{row['session_id']}:sample:e{uuid.uuid4().hex[:8]}")
            info["sampler_id"] = sampler_id
        sub = self._ordered(tenant, "save_weights_for_sampler", WorkKind.SAVE, req.model_id,
                            req.seq_id, Save(parent=parent), info, req.model_dump_json(), idem)
        if "sampler_id" in info:
            self.repo.insert_sampler({
                "sampler_id": info["sampler_id"], "tenant": tenant,
                "session_id": row["session_id"], "base_model": row["base_model"],
                "model_path": None, "source_model_id": req.model_id, "created": now(),
            })
        return sub

    def save_weights_external(
        self, tenant: str, req: s.SaveWeightsExternalRequest, idem: str | None
    ) -> Submitted:
        recipients = encryption.parse_recipients(req.age_encryption_recipients)
        name = check_name(req.path or f"export-{req.seq_id or 0:06d}")
        path = TinkerPath(req.model_id, "external", name)
        self._refuse_existing(tenant, path, req.model_dump_json(), req.model_id, req.seq_id)
        info = {"name": name, "ttl_seconds": req.ttl_seconds, "user_metadata": req.user_metadata,
                "age_recipients": recipients}
        return self._ordered(tenant, "save_weights_external", WorkKind.SAVE, req.model_id,
                             req.seq_id, Save(parent=str(path)), info, req.model_dump_json(), idem)

    def load_weights(self, tenant: str, req: s.LoadWeightsRequest, idem: str | None) -> Submitted:
        check_optimizer(req.optimizer_config)
        ckpt = self.find_checkpoint(tenant, parse_path(req.path))
        if req.optimizer and ckpt["kind"] != "training":
            raise InvalidRequest(f"{req.path} holds no optimizer state; load a weights/ checkpoint")
        fingerprint = req.model_dump_json()
        meta = ckpt.get("meta") or {}
        path = ckpt["tinker_path"]
        if req.model_id:  # legacy: load into an existing run, in sequence
            weights, optimizer = self._read_checkpoint(ckpt, req.optimizer)
            payload = LoadWeights(weights, optimizer, step=meta.get("step"), parent=path)
            return self._ordered(tenant, "load_weights", WorkKind.LOAD_WEIGHTS, req.model_id,
                                 req.seq_id, payload, {"path": path}, fingerprint, idem)
        if req.session_id is None or req.model_seq_id is None:
            raise InvalidRequest("load_weights needs model_id, or session_id and model_seq_id")
        self.session_row(tenant, req.session_id)
        runner = self.checkpoint_runner(ckpt, req.base_model)
        base = runner.base.name
        model_id = f"{req.session_id}:train:{req.model_seq_id}"
        user_metadata = req.user_metadata or inherited_metadata(self._source_metadata(ckpt))
        run_policy_name(tenant, model_id, user_metadata)  # a bad name is a 400 now, not a failed future
        request_id, created = self.futures.submit(
            tenant, "load_create", fingerprint, f"{req.session_id}:models", req.model_seq_id, idem
        )
        if created:
            try:
                weights, optimizer = self._read_checkpoint(ckpt, req.optimizer)
            except Exception:
                self.futures.forget(request_id)
                raise
            self._insert_run(tenant, req.session_id, model_id, base, meta.get("lora_flags") or
                             {"rank": 0}, user_metadata)
            ticket = Ticket(request_id, "load_create", {"path": path, "spec": weights.spec,
                                                        "user_metadata": user_metadata})
            payload = LoadRun(weights, optimizer, step=int(meta.get("step", 0)), parent=path)
            runner.submit(self.job(runner, WorkKind.LOAD_RUN, payload, tenant, ticket, run_id=model_id))
        return Submitted(request_id, model_id=model_id)

    def _read_checkpoint(self, ckpt: dict[str, Any], optimizer: bool) -> tuple[Any, Any]:
        """A checkpoint's weights (and Adam state), read and parsed before any job is queued."""
        files = self.checkpoints.read_files(ckpt)
        weights = lora_io.parse_peft_files(files).weights
        if not optimizer:
            return weights, None
        if OPTIMIZER_NAME not in files:
            raise InvalidRequest("this checkpoint holds no optimizer state")
        from safetensors.torch import load as st_load

        return weights, st_load(files[OPTIMIZER_NAME])

    def _source_metadata(self, ckpt: dict[str, Any]) -> dict[str, Any] | None:
        src = self.repo.run_by_id(ckpt["model_id"])
        return src["user_metadata"] if src else None


def check_optimizer(config: dict[str, Any] | None) -> None:
    """Refuse a non-Adam optimizer family where the run is created (where the client first
    names it), not at its first optim_step."""
    kind = (config or {}).get("type", "adamw")
    if kind != "adamw":
        raise InvalidRequest(
            f"optimizer {kind!r} is not supported by lorafleet: training runs use AdamW. Create the "
            "training client without optimizer= (the default AdamOptimizerConfig) and pass "
            "types.AdamParams to optim_step"
        )


def _flags_from_config(adapter_config: bytes) -> dict[str, Any]:
    config = json.loads(adapter_config or b"{}")
    targets = set(config.get("target_modules") or ())
    return {"rank": config.get("r"), "train_attn": bool(targets & set(ATTN_MODULES)),
            "train_mlp": bool(targets & set(MLP_MODULES)), "train_unembed": bool(targets & set(UNEMBED_MODULES)),
            "target_modules": sorted(targets), "lora_alpha": config.get("lora_alpha")}

