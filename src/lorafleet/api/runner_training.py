"""Training work of the engine thread: runs, forward_backward batches, optim steps, saves.

A mixin of `lorafleet.api.runner.Runner` (its state lives there); every method runs on the
engine thread. Loading and saving use standard PEFT files; saves also publish a catalog
revision with provenance (see `api/tinker/catalog_bridge.py`).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import torch

import lorafleet
from lorafleet.api.tinker import wire
from lorafleet.api.tinker.checkpoints import OPTIMIZER_NAME, TinkerPath
from lorafleet.api.tinker.futures import NOT_FINITE, PROTO_TYPE
from lorafleet.api.tinker.store import now
from lorafleet.errors import Conflict, InvalidRequest, LorafleetError
from lorafleet.lora.weights import LoraWeights
from lorafleet.train.types import AdamParams, Datum, FwdBwdRequest

from lorafleet.api.work import LiveModel, Op

log = logging.getLogger("lorafleet.tinker.runner")


class TrainingWork:
    """forward_backward / optim_step / save / load for the runs resident in one engine."""

    # ------------------------------------------------------------------ models

    def _do_create_model(self, op: Op) -> dict[str, Any]:
        p = op.payload
        handle = self.engine.create_adapter(p["spec"], seed=p.get("seed"))
        if self.catalog is not None:
            try:
                self.catalog.create_run(op.tenant, p["model_id"], self.base.name,
                                        getattr(self.base, "digest", None), p["spec"],
                                        p.get("user_metadata"))
            except Exception:
                self.engine.remove_adapter(handle)
                raise
        self.models[p["model_id"]] = LiveModel(
            model_id=p["model_id"], tenant=op.tenant, handle=handle, spec=p["spec"],
            lora_flags=p["lora_flags"],
        )
        return {"model_id": p["model_id"], "type": "create_model"}

    def _do_load_create(self, op: Op) -> dict[str, Any]:
        p = op.payload
        files = self.checkpoints.read_files(p["row"])
        adapter = _parse_peft(files)
        handle = self.engine.create_adapter(adapter.spec)
        try:
            self.engine.set_tensors(handle, adapter.tensors)
            if p["optimizer"]:
                self._load_optimizer(handle, files)
            if self.catalog is not None:
                self.catalog.create_run(op.tenant, p["model_id"], self.base.name,
                                        getattr(self.base, "digest", None), adapter.spec,
                                        p.get("user_metadata"), parent_path=p["row"]["tinker_path"])
        except Exception:
            self.engine.remove_adapter(handle)
            raise
        meta = p["row"].get("meta") or {}
        self.models[p["model_id"]] = LiveModel(
            model_id=p["model_id"], tenant=op.tenant, handle=handle, spec=adapter.spec,
            lora_flags=meta.get("lora_flags", {}), step=int(meta.get("step", 0)),
            parent=p["row"]["tinker_path"],
        )
        return {"path": p["row"]["tinker_path"], "model_id": p["model_id"], "type": "load_weights"}

    def _load_optimizer(self, handle: int, files: dict[str, bytes]) -> None:
        if OPTIMIZER_NAME not in files:
            raise InvalidRequest("this checkpoint holds no optimizer state")
        from safetensors.torch import load as st_load

        self.engine.load_optimizer_state(handle, st_load(files[OPTIMIZER_NAME]))

    def _do_load_weights(self, op: Op, model: LiveModel) -> dict[str, Any]:
        p = op.payload
        files = self.checkpoints.read_files(p["row"])
        adapter = _parse_peft(files)
        if adapter.spec != model.spec:
            raise InvalidRequest(
                f"checkpoint LoRA (rank {adapter.spec.rank}) does not match model {model.model_id} "
                f"(rank {model.spec.rank})"
            )
        self.engine.discard_grads(model.handle)
        self.engine.set_tensors(model.handle, adapter.tensors)
        if p["optimizer"]:
            self._load_optimizer(model.handle, files)
        model.parent = p["row"]["tinker_path"]
        model.step = int((p["row"].get("meta") or {}).get("step", model.step))
        return {"path": p["row"]["tinker_path"], "model_id": model.model_id, "type": "load_weights"}

    def _do_unload(self, op: Op) -> dict[str, Any]:
        """Drop a run's adapter from the engine (its session ended); queued work fails."""
        with self._cv:
            model = self.models.pop(op.payload["model_id"], None)
        if model is not None:
            self.engine.remove_adapter(model.handle)
            for queued in model.ops.values():
                self._fail(queued, Conflict(f"training run {model.model_id} was unloaded: "
                                            f"{op.payload.get('reason', 'its session ended')}"))
        return {}

    # ------------------------------------------------------------------ training

    def _run_fused(self, fused: list[tuple[LiveModel, Op]]) -> None:
        """One engine call for every request that validates; a bad one fails alone.

        Validation happens before any compute (the engine adds no gradient for a refused
        call), so innocent runs in the batch keep the gradients they accumulated earlier.
        """
        valid: list[tuple[LiveModel, Op, Any]] = []
        for m, op in fused:
            req = self._fwdbwd_request(m, op.payload)
            try:
                self.engine.validate(req)
            except LorafleetError as e:
                self._poison(m, op, e)
                continue
            valid.append((m, op, req))
        if not valid:
            return
        reqs = [req for _, _, req in valid]
        self.stats["fused_calls"] += 1
        self.stats["fused_requests"] += len(reqs)
        if self.metrics is not None:
            self.metrics.batch_size.labels("train").observe(sum(len(r.data) for r in reqs))
            self.metrics.tokens.labels("train").inc(sum(int(d.tokens.numel()) for r in reqs
                                                        for d in r.data))
        self.stats["max_fused_models"] = max(
            self.stats["max_fused_models"], len({m.model_id for m, _, _ in valid})
        )
        try:
            results = self.engine.forward_backward(reqs)
        except Exception as e:  # mid-computation failure: every run in the batch is suspect
            for m, op, _ in valid:
                self._poison(m, op, e)
            return
        for (m, op, _), res in zip(valid, results, strict=True):
            self._finish_fwdbwd(m, op, res)

    def _poison(self, model: LiveModel, op: Op, e: Exception) -> None:
        try:
            self.engine.discard_grads(model.handle)
        except Exception:
            log.exception("discard_grads failed for %s", model.model_id)
        message = self._fail(op, e)
        if not op.payload.forward_only:
            model.poisoned = f"forward_backward {op.request_id} failed: {message}"

    def _finish_fwdbwd(self, model: LiveModel, op: Op, res: Any) -> None:
        call: wire.FwdBwdCall = op.payload
        outputs = [{k: v.detach().cpu().float().numpy() for k, v in o.items()} for o in res.outputs]
        metrics = dict(res.metrics)
        metrics.setdefault("loss:sum", float(sum(o.get("elementwise_loss", np.zeros(1)).sum()
                                                for o in outputs)))
        if not call.forward_only:
            model.batches.update(call.fingerprint.encode())
            model.last_loss = {"loss_fn": call.loss_fn, "loss_config": call.loss_config}
        outcome = wire.FwdBwdOutcome(outputs, metrics)
        if not wire.is_finite(outcome):  # diverged: its gradients must not reach optim_step
            self._poison(model, op, InvalidRequest(
                f"forward_backward produced a non-finite loss or output: {NOT_FINITE}"))
            return
        self.futures.complete(op.request_id, wire.encode_forward_backward_output(outcome), PROTO_TYPE)

    def _fwdbwd_request(self, model: LiveModel, call: wire.FwdBwdCall) -> Any:
        data = []
        for d in call.data:
            inputs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.inputs.items()}
            if call.loss_fn == "cross_entropy" and "weights" not in inputs:
                inputs["weights"] = torch.ones(d.tokens.size, dtype=torch.float32)
            data.append(Datum(tokens=torch.from_numpy(d.tokens), loss_inputs=inputs))
        return FwdBwdRequest(
            adapter=model.handle, data=data, loss_fn=call.loss_fn,
            loss_config=dict(call.loss_config), forward_only=call.forward_only,
        )

    def _do_optim_step(self, op: Op, model: LiveModel) -> dict[str, Any]:
        if model.poisoned:
            reason, model.poisoned = model.poisoned, None
            self.engine.discard_grads(model.handle)
            raise InvalidRequest(f"optim_step refused: {reason}; its partial gradients were discarded")
        adam = op.payload
        metrics = self.engine.optim_step(model.handle, AdamParams(**adam))
        model.step += 1
        model.last_adam = adam
        self.store.update("runs", "model_id", model.model_id, step=model.step, last_request=now())
        return {"metrics": {k: float(v) for k, v in (metrics or {}).items()}, "type": "optim_step"}

    # ------------------------------------------------------------------ saving

    def _provenance(self, model: LiveModel, kind: str) -> dict[str, Any]:
        return {
            "kind": kind, "base_model": self.base.name, "base_digest": getattr(self.base, "digest", None),
            "step": model.step, "parent": model.parent, "loss": model.last_loss,
            "optimizer": model.last_adam, "batches_digest": model.batches.hexdigest(),
            "lora_flags": model.lora_flags, "tenant": model.tenant, "time": now(),
            "code_version": lorafleet.__version__,
        }

    def _peft_files(self, model: LiveModel, layout: str = "packed") -> tuple[LoraWeights, dict[str, bytes]]:
        """A snapshot of the run's weights and their PEFT files. Checkpoints and catalog
        revisions keep MoE expert LoRA in the packed layout (lorafleet's serving layout, see
        docs/moe.md); external exports use the per-expert layout PEFT loads. Dense adapters
        give the same bytes either way."""
        from lorafleet.lora import io as lora_io

        tensors = {k: v.detach().to("cpu", torch.float32).clone()
                   for k, v in self.engine.get_tensors(model.handle).items()}
        weights = lora_io.from_peft_tensors(model.spec, tensors)
        return weights, lora_io.peft_files(weights, self.base.name, layout=layout)

    def _save(self, op: Op, model: LiveModel, kind: str, with_optimizer: bool) -> dict[str, Any]:
        p = op.payload
        path = TinkerPath(model.model_id, kind, p["name"])
        if self.checkpoints.exists(path):
            raise Conflict(f"checkpoint {path} already exists; checkpoints are immutable")
        weights, files = self._peft_files(model, "per_expert" if kind == "external" else "packed")
        if with_optimizer:
            from safetensors.torch import save as st_save

            state = {k: v.detach().cpu().contiguous().clone()
                     for k, v in self.engine.optimizer_state(model.handle).items()}
            files[OPTIMIZER_NAME] = st_save(state)
        meta = self._provenance(model, kind)
        if self.catalog is not None:  # the catalog first: a failed publish leaves no checkpoint
            meta["revision_id"] = self.catalog.publish(op.tenant, path, files, meta,
                                                      p.get("ttl_seconds"))
        row = self.checkpoints.write(op.tenant, path, files, meta, p.get("ttl_seconds"),
                                     p.get("user_metadata"))
        model.parent = str(path)
        model.batches = hashlib.sha256()
        return {"path": str(path), "weights": weights, "size_bytes": row["size_bytes"]}

    def _do_save_weights(self, op: Op, model: LiveModel) -> dict[str, Any]:
        out = self._save(op, model, "training", with_optimizer=True)
        return {"path": out["path"], "type": "save_weights"}

    def _do_save_weights_external(self, op: Op, model: LiveModel) -> dict[str, Any]:
        out = self._save(op, model, "external", with_optimizer=False)
        return {"path": out["path"], "size_bytes": out["size_bytes"], "type": "save_weights_external"}

    def _do_save_weights_for_sampler(self, op: Op, model: LiveModel) -> dict[str, Any]:
        """Snapshot the adapter into a new immutable sampler version, live before we answer."""
        p = op.payload
        if p.get("name"):
            out = self._save(op, model, "sampler", with_optimizer=False)
            weights, sampler_id, result = out["weights"], out["path"], {"path": out["path"]}
        else:
            weights, _ = self._peft_files(model)
            sampler_id = p["sampler_id"]
            result = {"sampling_session_id": sampler_id}
        self._add_sampler(sampler_id, weights)  # host + slot, live before the future completes
        return {**result, "type": "save_weights_for_sampler"}


def _parse_peft(files: dict[str, bytes]) -> Any:
    from lorafleet.lora import io as lora_io

    return lora_io.parse_peft_files(files)
