"""The Tinker side of engine jobs: typed payloads built from validated wire calls, and the sink
that turns engine results into futures, checkpoints and catalog revisions.

`TinkerSink.done` / `failed` run on the engine's I/O worker (engine/scheduler.py), never on
a compute lane: a save's PEFT serialisation, blob writes and catalog publish happen here,
from the tensor snapshot the training lane took. A training or sampler save is one catalog
revision with provenance (see `catalog_bridge.py`) and its checkpoint row, in one transaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import lorafleet
from lorafleet.api.tinker import encryption, wire
from lorafleet.api.tinker.checkpoints import OPTIMIZER_NAME, Checkpoints, TinkerPath
from lorafleet.api.tinker.futures import PROTO_TYPE, FutureTable
from lorafleet.api.tinker.repo import TinkerRepo, now
from lorafleet.engine.jobs import ForwardBackward, Job, NullSink, Snapshot, UnloadRun, WorkKind
from lorafleet.engine.types import TopLogprobs
from lorafleet.errors import Conflict
from lorafleet.lora import io as lora_io
from lorafleet.train.types import Datum

log = logging.getLogger("lorafleet.tinker.jobs")


PARTIAL = object()  # a sink answer that completes no future yet (the first half of a train_step)


@dataclass(slots=True)
class Ticket:
    """A job's Tinker context: its future and what the client asked for (`job.tag`)."""

    request_id: str
    call: str  # the Tinker call: create_model, load_create, forward_backward, save_weights, ...
    info: dict[str, Any] = field(default_factory=dict)


def fwdbwd_payload(call: wire.FwdBwdCall) -> ForwardBackward:
    """The engine payload of a validated forward_backward call (zero-copy tensors)."""
    data = []
    for d in call.data:
        inputs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.inputs.items()}
        if call.loss_fn == "cross_entropy" and "weights" not in inputs:
            inputs["weights"] = torch.ones(inputs["target_tokens"].shape, dtype=torch.float32)
        data.append(Datum(tokens=torch.from_numpy(d.tokens), loss_inputs=inputs))
    return ForwardBackward(data=data, loss_fn=call.loss_fn, loss_config=dict(call.loss_config),
                           forward_only=call.forward_only, fingerprint=call.fingerprint)


class TinkerSink:
    """Completes Tinker futures from engine results (on the engine's I/O worker)."""

    def __init__(self, futures: FutureTable, repo: TinkerRepo, checkpoints: Checkpoints,
                 base: Any, scheduler: Any, catalog: Any = None) -> None:
        self.futures = futures
        self.repo = repo
        self.checkpoints = checkpoints
        self.base = base
        self.scheduler = scheduler
        self.catalog = catalog  # a CatalogBridge, or None to keep checkpoints local only

    # ---- the sink protocol --------------------------------------------------------------------

    def done(self, job: Job, result: Any) -> None:
        t: Ticket = job.tag
        answer = getattr(self, f"_{t.call}")(job, t, result)
        if not t.request_id or answer is PARTIAL:
            return
        if isinstance(answer, bytes):
            self.futures.complete(t.request_id, answer, PROTO_TYPE)
        else:  # a non-finite number fails the future (a user error)
            self.futures.complete_json(t.request_id, answer)

    def failed(self, job: Job, error: Exception) -> None:
        t: Ticket = job.tag
        if t.request_id:  # a non-lorafleet error is logged; its text never reaches the client
            self.futures.fail(t.request_id, error, f"{t.call} {t.request_id}")

    def on_token(self, job: Job, request: int, sample: int, token: int, logprob: float,
                 top: TopLogprobs | None = None) -> None:
        pass

    # ---- runs ---------------------------------------------------------------------------------

    def _create_run(self, job: Job, parent_path: str | None = None) -> None:
        if self.catalog is None:
            return
        t: Ticket = job.tag
        try:
            self.catalog.create_run(job.tenant, job.run_id, self.base.name,
                                    getattr(self.base, "digest", None), t.info["spec"],
                                    t.info.get("user_metadata"), parent_path=parent_path)
        except Exception:  # no catalog policy: the run must not stay loaded
            self.scheduler.submit(Job(WorkKind.UNLOAD_RUN, UnloadRun("its catalog policy failed"),
                                      NullSink(), run_id=job.run_id, tenant=job.tenant,
                                      tag=Ticket("", "unload")))
            raise

    def _create_model(self, job: Job, t: Ticket, state: Any) -> dict[str, Any]:
        self._create_run(job)
        return {"model_id": job.run_id, "type": "create_model"}

    def _load_create(self, job: Job, t: Ticket, state: Any) -> dict[str, Any]:
        self._create_run(job, parent_path=t.info["path"])
        return {"path": t.info["path"], "model_id": job.run_id, "type": "load_weights"}

    def _load_weights(self, job: Job, t: Ticket, state: Any) -> dict[str, Any]:
        return {"path": t.info["path"], "model_id": job.run_id, "type": "load_weights"}

    def _unload(self, job: Job, t: Ticket, state: Any) -> None:
        return None

    # ---- training -----------------------------------------------------------------------------

    def _forward_backward(self, job: Job, t: Ticket, res: Any) -> bytes:
        outputs = [{k: v.detach().cpu().float().numpy() for k, v in o.items()} for o in res.outputs]
        metrics = dict(res.metrics)
        metrics.setdefault("loss:sum", float(sum(o.get("elementwise_loss", np.zeros(1)).sum()
                                                for o in outputs)))
        return wire.encode_forward_backward_output(wire.FwdBwdOutcome(outputs, metrics))

    def _optim_step(self, job: Job, t: Ticket, res: Any) -> dict[str, Any]:
        self.repo.update_run(job.run_id, step=res.state.step, last_request=now())
        return {"metrics": res.metrics, "type": "optim_step"}

    def _train_step_fwdbwd(self, job: Job, t: Ticket, res: Any) -> object:
        """The first half of a fused train_step: kept for its optim_step (the same future)."""
        t.info["forward_backward"] = self._forward_backward(job, t, res)
        return PARTIAL

    def _train_step(self, job: Job, t: Ticket, res: Any) -> dict[str, Any]:
        step = self._optim_step(job, t, res)
        output = wire.fwdbwd_proto_to_json(t.info.pop("forward_backward"))
        return {"output": output, "metrics": step["metrics"], "type": "train_step"}

    def _reverse_kl(self, job: Job, t: Ticket, res: Any) -> dict[str, Any]:
        """MinT's reverse-KL answer; the run now carries its reference for the next save's
        provenance (api/tinker/distill.py)."""
        out = wire.fwdbwd_proto_to_json(self._forward_backward(job, t, res))
        row = self.repo.run_by_id(job.run_id or "") or {}
        lora = dict(row.get("lora") or {})
        lora["reverse_kl"] = {**t.info, "calls": (lora.get("reverse_kl") or {}).get("calls", 0) + 1}
        self.repo.update_run(job.run_id or "", lora=lora, last_request=now())
        outputs = [{"loss": {"data": [float(sum(o["elementwise_loss"]["data"]))] if "elementwise_loss" in o
                             else [0.0], "dtype": "float32", "shape": [1]}, **o}
                   for o in out["loss_fn_outputs"]]
        return {"outputs": outputs, "metrics": out["metrics"], "type": "mint_forward_backward_reverse_kl"}

    # ---- saving -------------------------------------------------------------------------------

    def _provenance(self, job: Job, snap: Snapshot, kind: str) -> dict[str, Any]:
        s = snap.state
        row = self.repo.run_by_id(job.run_id or "") or {}
        adam = None if s.last_adam is None else {
            k: getattr(s.last_adam, k) for k in s.last_adam.__dataclass_fields__}
        return {
            "kind": kind, "base_model": self.base.name, "base_digest": getattr(self.base, "digest", None),
            "step": s.step, "parent": s.parent, "loss": s.last_loss, "optimizer": adam,
            "batches_digest": s.batches_digest, "lora_flags": row.get("lora") or {},
            "tenant": job.tenant, "time": now(), "code_version": lorafleet.__version__,
        }

    def _write(self, job: Job, t: Ticket, snap: Snapshot, kind: str) -> tuple[TinkerPath, dict[str, Any]]:
        """Checkpoint files from the snapshot: blobs first, then the catalog revision and the
        checkpoint row in one transaction (a failed publish leaves no checkpoint). MoE expert
        LoRA stays packed except in external exports (the per-expert layout PEFT loads, see
        docs/moe.md)."""
        path = TinkerPath(job.run_id or "", kind, t.info["name"])
        if self.checkpoints.exists(path):
            raise Conflict(f"checkpoint {path} already exists; checkpoints are immutable")
        files = lora_io.peft_files(snap.weights, self.base.name,
                                   layout="per_expert" if kind == "external" else "packed")
        if snap.optimizer is not None:
            from safetensors.torch import save as st_save

            files[OPTIMIZER_NAME] = st_save(snap.optimizer)
        meta = self._provenance(job, snap, kind)
        distilled = (meta["lora_flags"] or {}).pop("reverse_kl", None)
        if distilled and kind != "external":  # trained against a reference since the last save
            meta["loss"] = {"loss_fn": "reverse_kl", "loss_config": {**distilled, "engine_loss": meta["loss"]}}
        if t.info.get("age_recipients"):  # an encrypted export: only .age files leave the server
            files = encryption.encrypt_files(files, t.info["age_recipients"])
            meta["age_encrypted"] = True
        ttl = t.info.get("ttl_seconds")
        publish = None
        if self.catalog is not None and kind != "external":  # exports are downloads, not revisions
            publish = lambda files, on_commit: self.catalog.publish(  # noqa: E731
                job.tenant, path, files, meta, ttl, on_commit=on_commit)
        row = self.checkpoints.write(job.tenant, path, files, meta, ttl, t.info.get("user_metadata"),
                                     publish=publish)
        if distilled and kind != "external":  # the next revision records only its own window
            self.repo.clear_run_flag(job.run_id or "", "reverse_kl")
        return path, row

    def _save_weights(self, job: Job, t: Ticket, snap: Snapshot) -> dict[str, Any]:
        path, _ = self._write(job, t, snap, "training")
        return {"path": str(path), "type": "save_weights"}

    def _save_weights_external(self, job: Job, t: Ticket, snap: Snapshot) -> dict[str, Any]:
        path, row = self._write(job, t, snap, "external")
        return {"path": str(path), "size_bytes": row["size_bytes"], "type": "save_weights_external"}

    def _save_weights_for_sampler(self, job: Job, t: Ticket, snap: Snapshot) -> dict[str, Any]:
        """A new immutable sampler version, in host memory before the future completes."""
        if t.info.get("name"):
            path, _ = self._write(job, t, snap, "sampler")
            key, result = str(path), {"path": str(path)}
        else:
            key, result = t.info["sampler_id"], {"sampling_session_id": t.info["sampler_id"]}
        self.scheduler.residency.add_host(key, snap.weights)
        return {**result, "type": "save_weights_for_sampler"}

    # ---- sampling -----------------------------------------------------------------------------

    def _sample(self, job: Job, t: Ticket, results: list[Any]) -> bytes:
        res = results[0]
        out = wire.SampleOutcome(
            sequences=[wire.SampledSeq(list(s.tokens), [float(x) for x in s.logprobs], s.stop_reason, s.top_logprobs)
                       for s in res.sequences],
            prompt_logprobs=None if res.prompt_logprobs is None else list(res.prompt_logprobs),
        )
        sc = res.prompt_scores
        if sc is not None:
            if sc.logprobs is not None:
                out.prompt_logprobs = list(sc.logprobs)
            if sc.topk_ids is not None:
                out.topk_prompt = (sc.topk_ids.numpy(), sc.topk_logprobs.numpy())
            if sc.targets is not None:
                out.target_prompt = (t.info["targets"], sc.targets.numpy())
            if sc.alt_tokens is not None:
                out.alt_tokens = (sc.alt_tokens.numpy(), sc.alt_logprobs.numpy())
        return wire.encode_sample_response(out)


