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
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

import lorafleet
from lorafleet.api.tinker import wire
from lorafleet.api.tinker.checkpoints import (
    OPTIMIZER_NAME,
    Checkpoints,
    TinkerPath,
)
from lorafleet.api.tinker.futures import JSON_TYPE, PROTO_TYPE, FutureTable
from lorafleet.api.tinker.store import TinkerStore, now
from lorafleet.errors import Conflict, InvalidRequest, LorafleetError, NoCapacity, NotFound
from lorafleet.lora.spec import LoraSpec

log = logging.getLogger("lorafleet.tinker.runner")

FWDBWD = "forward_backward"
BARRIERS = frozenset({"optim_step", "save_weights", "save_weights_for_sampler",
                      "save_weights_external", "load_weights"})


@dataclass(slots=True, eq=False)
class Op:
    """One unit of queued work; `payload` is already validated wire data."""

    request_id: str
    kind: str
    tenant: str
    payload: Any
    model_id: str | None = None
    seq_id: int | None = None
    submitted: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class LiveModel:
    """A training run resident in this engine."""

    model_id: str
    tenant: str
    handle: int
    spec: LoraSpec
    lora_flags: dict[str, Any]
    step: int = 0
    next_seq: int = 1
    ops: dict[int, Op] = field(default_factory=dict)
    gap_since: float | None = None
    poisoned: str | None = None
    batches: Any = field(default_factory=hashlib.sha256)  # digest of data since last save
    last_loss: dict[str, Any] | None = None
    last_adam: dict[str, float] | None = None
    parent: str | None = None


@dataclass(slots=True)
class SamplerVersion:
    """Immutable weights a sampler samples from; `tensors` None = the base model itself."""

    spec: LoraSpec | None
    tensors: dict[str, torch.Tensor] | None
    handle: int | None = None


def engine_types() -> Any:
    """The engine's record classes, wherever the engine package defines them."""
    import importlib

    names = {}
    for mod in ("lorafleet.engine.types", "lorafleet.train.types", "lorafleet.engine"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        for n in ("Datum", "FwdBwdRequest", "AdamParams", "SampleRequest", "SamplingParams"):
            if n not in names and hasattr(m, n):
                names[n] = getattr(m, n)
    return type("EngineTypes", (), names)


class Runner:
    """Owns one engine and the thread that drives it."""

    def __init__(
        self,
        engine: Any,
        base: Any,
        futures: FutureTable,
        store: TinkerStore,
        checkpoints: Checkpoints,
        *,
        types: Any = None,
        gap_timeout_s: float = 30.0,
        max_sample_queue: int = 512,
        max_live_samplers: int = 16,
        max_sampler_versions: int = 64,
        max_fused_tokens: int = 65536,
        catalog: Any = None,
        residency: Any = None,
    ) -> None:
        self.engine = engine
        self.base = base
        self.futures = futures
        self.store = store
        self.checkpoints = checkpoints
        self.t = types or engine_types()
        self.gap_timeout_s = gap_timeout_s
        self.max_sample_queue = max_sample_queue
        self.max_live_samplers = max_live_samplers
        self.max_sampler_versions = max_sampler_versions
        self.max_fused_tokens = max_fused_tokens
        self.catalog = catalog  # a CatalogBridge, or None to keep checkpoints local only
        self.residency = residency  # engine.residency.Residency for catalog revisions (serving)
        from lorafleet.engine.serving import ServingQueue

        self.serving = ServingQueue(max_jobs=max_sample_queue)
        self.max_serving_adapters = 32
        self.models: dict[str, LiveModel] = {}
        self.samplers: OrderedDict[str, SamplerVersion] = OrderedDict()
        self._unordered: deque[Op] = deque()
        self._samples: deque[Op] = deque()
        self._pending_models: set[str] = set()
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=f"engine-{base.name}", daemon=True)
        self.stats = {"fused_calls": 0, "fused_requests": 0, "max_fused_models": 0}
        # OpenMP thread counts are per thread: carry the creator's setting into the engine thread
        self._torch_threads = torch.get_num_threads()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        self.serving.fail_all(NoCapacity("the server is shutting down"))

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
                    self._cv.wait(timeout=self._wait_s())
                if self._stop:
                    return
                unordered = list(self._unordered)
                self._unordered.clear()
                fused = self._take_fused()
                barriers = self._take_barriers() if not fused else []
                samples = list(self._samples)
                self._samples.clear()
            samples += self._take_serving()
            for op in unordered:
                self._run_one(op)
            if fused:
                self._run_fused(fused)
            for model, op in barriers:
                self._run_one(op, model)
            if samples:
                self._run_samples(samples)

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
        except LorafleetError as e:
            self._fail(op, str(e), "user")
        except Exception as e:  # a bug or an engine failure: report it, keep serving
            log.exception("%s %s failed", op.kind, op.request_id)
            self._fail(op, f"{type(e).__name__}: {e}", "server")
        else:
            if op.request_id:
                self.futures.complete(op.request_id, json.dumps(result).encode(), JSON_TYPE)
        finally:
            if op.kind in ("create_model", "load_create"):
                with self._cv:
                    self._pending_models.discard(op.payload["model_id"])

    def _fail(self, op: Op, message: str, category: str) -> None:
        self.futures.fail(op.request_id, message, category)

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
            self._set_tensors(handle, adapter.tensors)
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

    def _set_tensors(self, handle: int, tensors: dict[str, torch.Tensor]) -> None:
        """Set weights in the engine's own key order: its optimizer state is positional, and
        safetensors files come back sorted by name."""
        order = list(self.engine.get_tensors(handle))
        if set(order) == set(tensors):
            tensors = {k: tensors[k] for k in order}
        self.engine.set_tensors(handle, tensors)

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
        self._set_tensors(model.handle, adapter.tensors)
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
                self._fail(queued, f"training run {model.model_id} was unloaded: "
                                   f"{op.payload.get('reason', 'its session ended')}", "user")
        return {}

    # ------------------------------------------------------------------ training

    def _run_fused(self, fused: list[tuple[LiveModel, Op]]) -> None:
        reqs = [self._fwdbwd_request(m, op.payload) for m, op in fused]
        self.stats["fused_calls"] += 1
        self.stats["fused_requests"] += len(reqs)
        self.stats["max_fused_models"] = max(
            self.stats["max_fused_models"], len({m.model_id for m, _ in fused})
        )
        try:
            results = self.engine.forward_backward(reqs)
        except Exception as e:
            if len(fused) > 1 and isinstance(e, LorafleetError):
                for m, _ in fused:  # isolate the bad request: rerun each alone
                    self.engine.discard_grads(m.handle)
                for m, op in fused:
                    self._run_fused_one(m, op)
                return
            for m, op in fused:
                self._poison(m, op, e)
            return
        for (m, op), res in zip(fused, results, strict=True):
            self._finish_fwdbwd(m, op, res)

    def _run_fused_one(self, model: LiveModel, op: Op) -> None:
        try:
            res = self.engine.forward_backward([self._fwdbwd_request(model, op.payload)])[0]
        except Exception as e:
            self._poison(model, op, e)
        else:
            self._finish_fwdbwd(model, op, res)

    def _poison(self, model: LiveModel, op: Op, e: Exception) -> None:
        try:
            self.engine.discard_grads(model.handle)
        except Exception:
            log.exception("discard_grads failed for %s", model.model_id)
        if not op.payload.forward_only:
            model.poisoned = f"forward_backward {op.request_id} failed: {e}"
        user = isinstance(e, LorafleetError)
        if not user:
            log.exception("forward_backward failed", exc_info=e)
        self._fail(op, str(e) if user else f"{type(e).__name__}: {e}", "user" if user else "server")

    def _finish_fwdbwd(self, model: LiveModel, op: Op, res: Any) -> None:
        call: wire.FwdBwdCall = op.payload
        outputs = [{k: v.detach().cpu().float().numpy() for k, v in o.items()} for o in res.outputs]
        metrics = dict(res.metrics)
        metrics.setdefault("loss:sum", float(sum(o.get("elementwise_loss", np.zeros(1)).sum()
                                                for o in outputs)))
        if not call.forward_only:
            model.batches.update(call.fingerprint.encode())
            model.last_loss = {"loss_fn": call.loss_fn, "loss_config": call.loss_config}
        payload = wire.encode_forward_backward_output(wire.FwdBwdOutcome(outputs, metrics))
        self.futures.complete(op.request_id, payload, PROTO_TYPE)

    def _fwdbwd_request(self, model: LiveModel, call: wire.FwdBwdCall) -> Any:
        data = []
        for d in call.data:
            inputs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.inputs.items()}
            if call.loss_fn == "cross_entropy" and "weights" not in inputs:
                inputs["weights"] = torch.ones(d.tokens.size, dtype=torch.float32)
            data.append(self.t.Datum(tokens=torch.from_numpy(d.tokens), loss_inputs=inputs))
        return self.t.FwdBwdRequest(
            adapter=model.handle, data=data, loss_fn=call.loss_fn,
            loss_config=dict(call.loss_config), forward_only=call.forward_only,
        )

    def _do_optim_step(self, op: Op, model: LiveModel) -> dict[str, Any]:
        if model.poisoned:
            reason, model.poisoned = model.poisoned, None
            self.engine.discard_grads(model.handle)
            raise InvalidRequest(f"optim_step refused: {reason}; its partial gradients were discarded")
        adam = op.payload
        metrics = self.engine.optim_step(model.handle, self.t.AdamParams(**adam))
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

    def _peft_files(self, model: LiveModel) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
        from lorafleet.lora import io as lora_io

        tensors = {k: v.detach().to("cpu", torch.float32).clone()
                   for k, v in self.engine.get_tensors(model.handle).items()}
        weights = lora_io.from_peft_tensors(model.spec, tensors)
        return tensors, lora_io.peft_files(weights, self.base.name)

    def _save(self, op: Op, model: LiveModel, kind: str, with_optimizer: bool) -> dict[str, Any]:
        p = op.payload
        path = TinkerPath(model.model_id, kind, p["name"])
        if self.checkpoints.exists(path):
            raise Conflict(f"checkpoint {path} already exists; checkpoints are immutable")
        tensors, files = self._peft_files(model)
        if with_optimizer:
            from safetensors.torch import save as st_save

            state = {k: v.detach().cpu().contiguous().clone()
                     for k, v in self.engine.optimizer_state(model.handle).items()}
            files[OPTIMIZER_NAME] = st_save(state)
        meta = self._provenance(model, kind)
        if self.catalog is not None:  # the catalog first: a failed publish leaves no checkpoint
            meta["revision_id"] = self.catalog.publish(op.tenant, path, files, meta)
        row = self.checkpoints.write(op.tenant, path, files, meta, p.get("ttl_seconds"),
                                     p.get("user_metadata"))
        model.parent = str(path)
        model.batches = hashlib.sha256()
        return {"path": str(path), "tensors": tensors, "size_bytes": row["size_bytes"]}

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
            tensors, sampler_id, result = out["tensors"], out["path"], {"path": out["path"]}
        else:
            tensors, _ = self._peft_files(model)
            sampler_id = p["sampler_id"]
            result = {"sampling_session_id": sampler_id}
        self._add_sampler(sampler_id, SamplerVersion(model.spec, tensors))
        self._activate(sampler_id)  # live before the future completes
        return {**result, "type": "save_weights_for_sampler"}

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
        self._set_tensors(handle, version.tensors)
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
                adapter = _parse_peft(self.checkpoints.read_files(row))
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
            flat = self.engine.sample([r for _, reqs in ready for r in reqs])
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


def _parse_peft(files: dict[str, bytes]) -> Any:
    from lorafleet.lora import io as lora_io

    return lora_io.parse_peft_files(files)
