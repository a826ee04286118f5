"""MinT's extensions beyond Tinker (reference/mint_paper.md §5.2), for real:

- `interpolate`: a new sampler checkpoint sum_i c_i * delta_i of source adapters of one base
  and rank (lora/interpolate.py: exact by stacking ranks, or SVD re-projected to `target_rank`),
  published as a catalog revision whose provenance names the sources and coefficients;
- `train_step`: forward_backward + optim_step in one round trip and one future (the engine
  runs the optim step right after the forward_backward, at the same seq_id: `Job.then`);
- `upload`: a `.tar.gz` checkpoint archive (upload.py checks it) becomes a `weights/`
  checkpoint of a new run of the caller, which `create_training_client_from_state[_with_optimizer]`
  resumes from.

(`forward_backward_reverse_kl` is distill.py.) Plain functions of a `TinkerService`; every check happens before anything is written.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from lorafleet.api.tinker import ext_schemas as x
from lorafleet.api.tinker import schemas as s
from lorafleet.api.tinker import upload as archive
from lorafleet.api.tinker import wire
from lorafleet.api.tinker.catalog_bridge import POLICY_KEY, run_policy_name
from lorafleet.api.tinker.checkpoints import OPTIMIZER_NAME, TinkerPath, check_name, parse_path
from lorafleet.api.tinker.jobs import Ticket, fwdbwd_payload
from lorafleet.api.tinker.repo import now
from lorafleet.api.tinker.submitted import Submitted
from lorafleet.engine.jobs import OptimStep, WorkKind
from lorafleet.errors import IncompatibleAdapter, InvalidRequest
from lorafleet.lora import interpolate as soup
from lorafleet.lora import io as lora_io
from lorafleet.model.registry import check_base_digest
from lorafleet.train.types import AdamParams

INTERPOLATE_LOSS = "interpolate"  # the provenance `loss_fn` of an interpolated revision


# ---------------------------------------------------------------------- interpolate


def interpolate(svc: Any, tenant: str, req: x.InterpolateRequest) -> dict[str, Any]:
    if len(req.source_paths) != len(req.coefficients):
        raise InvalidRequest(f"{len(req.source_paths)} source_paths but {len(req.coefficients)} "
                             "coefficients: give one coefficient per source")
    paths = [parse_path(p) for p in req.source_paths]
    if len(set(map(str, paths))) != len(paths):
        raise InvalidRequest("source_paths name a checkpoint twice: add its coefficients instead")
    rows = [svc.find_checkpoint(tenant, p) for p in paths]
    bases = {(r.get("meta") or {}).get("base_model") for r in rows}
    if len(bases) != 1:
        raise InvalidRequest(f"the sources are adapters of different base models {sorted(map(str, bases))}: "
                             "interpolate adapters of one base")
    runner = svc.checkpoint_runner(rows[0])
    for r in rows[1:]:
        svc.checkpoint_runner(r)  # the same base name trained on other weights is refused too
    sources = [lora_io.parse_peft_files(svc.checkpoints.read_files(r)).weights for r in rows]
    try:
        combined = soup.interpolate(sources, req.coefficients, req.target_rank)
        weights = combined.weights.checked(runner.base.info)
    except IncompatibleAdapter as e:
        raise InvalidRequest(f"cannot interpolate these sources: {e}") from e
    user_metadata = {POLICY_KEY: req.policy} if req.policy else None
    # the result is a run of its own (its LoRA shape differs from the sources'), not trainable
    session_id = f"s-{uuid.uuid4().hex[:16]}"
    model_id = f"{session_id}:train:0"
    run_policy_name(tenant, model_id, user_metadata)  # a bad policy name is a 400 now
    target = TinkerPath(model_id, "sampler", check_name(req.output_path or "interpolated"))
    files = lora_io.peft_files(weights, runner.base.name, layout="packed")
    flags = {**_flags(files), "rank": weights.spec.rank}
    meta = {
        "kind": "sampler", "base_model": runner.base.name,
        "base_digest": getattr(runner.base, "digest", None), "step": None,
        "parent": str(paths[0]), "tenant": tenant, "time": now(), "lora_flags": flags,
        "loss": {"loss_fn": INTERPOLATE_LOSS, "loss_config": {
            "sources": [str(p) for p in paths], "coefficients": list(req.coefficients),
            "target_rank": req.target_rank, "max_frobenius_error": combined.max_error}},
    }
    t = now()
    svc.repo.insert_finished_run({
        "session_id": session_id, "tenant": tenant, "created": t, "last_heartbeat": t,
        "finished": "success", "user_metadata": user_metadata, "display_name": f"interpolation of {paths[0]}",
        "tags": ["interpolate"], "sdk_version": None, "project_id": None,
    }, {"model_id": model_id, "tenant": tenant, "session_id": session_id, "base_model": runner.base.name,
        "lora": flags, "user_metadata": user_metadata, "created": t, "last_request": t})
    publish = None
    try:
        if svc.catalog is not None:  # the revision and the checkpoint row: one transaction
            svc.catalog.create_run(tenant, model_id, runner.base.name, meta["base_digest"], weights.spec,
                                   user_metadata, parent_path=str(paths[0]))
            publish = lambda files, on_commit: svc.catalog.publish(  # noqa: E731
                tenant, target, files, meta, on_commit=on_commit)
        svc.checkpoints.write(tenant, target, files, meta, publish=publish)
    except Exception:
        svc.repo.delete_run(tenant, model_id, session_id)
        raise
    return {"path": str(target), "checkpoint_type": "sampler", "source_paths": [str(p) for p in paths],
            "coefficients": list(req.coefficients), "has_rank_shards": req.target_rank is None,
            "rank": weights.spec.rank, "max_frobenius_error": combined.max_error,
            "type": "mint_interpolate_checkpoints"}


# ---------------------------------------------------------------------- train_step


def train_step(svc: Any, tenant: str, body: dict[str, Any], idem: str | None) -> Submitted:
    """One future for forward_backward then optim_step on one run, at one seq_id."""
    req = x.validate(x.TrainStepRequest, body)
    call = wire.decode_forward_backward_json(body, False)
    _, runner = svc.live_run(tenant, call.model_id)
    svc._check_loss(call, runner)
    if call.seq_id <= 0:
        raise InvalidRequest("seq_id must be >= 1")
    adam = AdamParams(**(req.adam_params or s.AdamParams()).model_dump())
    # the fingerprint digests the whole body, adam_params included
    request_id, created = svc.futures.submit(tenant, "train_step", call.fingerprint, call.model_id,
                                             call.seq_id, idem)
    if created:
        try:
            shared: dict[str, Any] = {}
            first = svc.job(runner, WorkKind.FORWARD_BACKWARD, fwdbwd_payload(call), tenant,
                            Ticket(request_id, "train_step_fwdbwd", shared), call.model_id, call.seq_id)
            first.then = svc.job(runner, WorkKind.OPTIM_STEP, OptimStep(adam), tenant,
                                 Ticket(request_id, "train_step", shared), call.model_id, call.seq_id)
            runner.submit(first)
        except Exception:
            svc.futures.forget(request_id)
            raise
    svc.repo.update_run(call.model_id, last_request=now())
    return Submitted(request_id, model_id=call.model_id)


# ---------------------------------------------------------------------- upload


def upload(svc: Any, tenant: str, data: bytes, base_model: str | None, name: str | None) -> dict[str, Any]:
    """A `weights/` checkpoint of a new (untrainable until resumed) run from a checked archive."""
    files = archive.read_archive(data)
    adapter = lora_io.parse_peft_files(files)  # IncompatibleAdapter (400) for a bad adapter
    meta_in: dict[str, Any] = {}
    if archive.META_NAME in files:  # not stored: what it says goes into the checkpoint's row
        try:
            meta_in = json.loads(files.pop(archive.META_NAME))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidRequest(f"{archive.META_NAME} in the archive is not valid JSON: {e}") from e
        if not isinstance(meta_in, dict):
            raise InvalidRequest(f"{archive.META_NAME} in the archive must hold a JSON object")
    base = base_model or adapter.base_model or meta_in.get("base_model")
    if not base:
        raise InvalidRequest("the archive does not name its base model: pass base_model")
    runner = svc.runner(str(base))
    if meta_in.get("base_digest"):  # trained on other weights published under this name: refused
        check_base_digest(runner.base, str(meta_in["base_digest"]), "the uploaded checkpoint")
    adapter.weights.checked(runner.base.info)  # shapes fit this base (IncompatibleAdapter: 400)
    if OPTIMIZER_NAME in files:
        from safetensors.torch import load as st_load

        try:
            st_load(files[OPTIMIZER_NAME])
        except Exception as e:
            raise InvalidRequest(f"{OPTIMIZER_NAME} in the archive is not a readable safetensors file") from e
    ckpt_name = check_name(name or f"upload-{uuid.uuid4().hex[:12]}")
    session_id = f"s-{uuid.uuid4().hex[:16]}"
    model_id = f"{session_id}:train:0"
    path = TinkerPath(model_id, "training", ckpt_name)
    flags = _flags(files)
    t = now()
    step = meta_in.get("step")
    meta = {"kind": "training", "base_model": runner.base.name,
            "base_digest": getattr(runner.base, "digest", None),
            "step": int(step) if isinstance(step, int) and step >= 0 else 0,
            "parent": None, "lora_flags": flags, "tenant": tenant, "time": t, "uploaded": True}
    svc.repo.insert_finished_run({
        "session_id": session_id, "tenant": tenant, "created": t, "last_heartbeat": t,
        "finished": "success", "user_metadata": None, "display_name": f"upload {ckpt_name}",
        "tags": ["checkpoint_upload"], "sdk_version": None, "project_id": None,
    }, {"model_id": model_id, "tenant": tenant, "session_id": session_id,
        "base_model": runner.base.name, "lora": flags, "user_metadata": None,
        "created": t, "last_request": t})
    try:  # not a catalog revision: the run that resumes from it publishes its own saves
        svc.checkpoints.write(tenant, path, files, meta)
    except Exception:
        svc.repo.delete_run(tenant, model_id, session_id)
        raise
    return {"path": str(path), "tinker_path": str(path), "checkpoint_id": path.checkpoint_id,
            "has_optimizer_state": OPTIMIZER_NAME in files, "type": "checkpoint_upload"}


def _flags(files: dict[str, bytes]) -> dict[str, Any]:
    from lorafleet.api.tinker.service import _flags_from_config

    return _flags_from_config(files.get(lora_io.CONFIG_NAME, b"{}"))
