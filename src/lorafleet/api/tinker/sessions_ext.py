"""The session and copy calls tinker SDK 0.38 added: `copy_weights`, `search_sessions`,
`assign_session_project`, `export_session_trace` (the trace itself is `trace.py`).

Plain functions of a `TinkerService` (its repository and checkpoints), returning the JSON the
SDK's pydantic types read (`CopyWeightsResponse`, `SessionSearchResponse`, ...). A project is
a label on a session (set at `create_session` or moved here); a tenant sees only its own
sessions whatever it searches, as everywhere else in lorafleet.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

from lorafleet.api.tinker import ext_schemas as s
from lorafleet.api.tinker.checkpoints import TinkerPath, parse_path
from lorafleet.api.tinker.repo import now
from lorafleet.errors import Conflict, InvalidRequest, NotFound

MIN_COPY_TTL_S = 3600
MAX_COPY_TTL_S = 10 * 365 * 86400
DEFAULT_PROJECT = "default"  # what a session created without a project reports
CLIENT_REASONS = ("success", "errored", "interrupted")


# ---------------------------------------------------------------------- copy_weights


def copy_weights(svc: Any, tenant: str, req: s.CopyWeightsRequest, idem: str | None) -> dict[str, Any]:
    """A copy of a checkpoint (its own or a published one) owned by a new training run of the
    caller, which cannot be trained on. The copy keeps the source's kind and name."""
    if req.weights_access_token:
        raise InvalidRequest("weights_access_token is not supported by lorafleet: ask the owner "
                             "to publish the checkpoint (RestClient.publish_checkpoint_from_tinker_path)")
    if req.ttl_seconds is not None and not MIN_COPY_TTL_S <= req.ttl_seconds <= MAX_COPY_TTL_S:
        raise InvalidRequest(f"ttl_seconds must be between {MIN_COPY_TTL_S} (1 hour) and "
                             f"{MAX_COPY_TTL_S} (10 years), or omitted; got {req.ttl_seconds}")
    source = parse_path(req.source_path)
    row = svc.find_checkpoint(tenant, source)
    meta = dict(row.get("meta") or {})
    t = now()
    new_session: dict[str, Any] | None = None  # the session a project copy makes for itself
    if req.session_id is not None:
        if req.model_seq_id is None:
            raise InvalidRequest("copy_weights with session_id needs model_seq_id as well")
        session = svc.session_row(tenant, req.session_id)
        model_id = f"{session['session_id']}:train:{req.model_seq_id}"
    elif req.destination_project_id:
        session_id = _copy_session_id(tenant, idem)
        model_id = f"{session_id}:train:0"
        existing = svc.repo.session_by_id(session_id)
        if existing is None:
            new_session = {
                "session_id": session_id, "tenant": tenant, "created": t, "last_heartbeat": t,
                "finished": "success", "user_metadata": {"copied_from": str(source)},
                "display_name": f"copy of {source}", "tags": ["copy_weights"],
                "sdk_version": None, "project_id": req.destination_project_id}
        elif existing["tenant"] != tenant:
            raise NotFound(f"session {session_id} not found")
    else:
        raise InvalidRequest("copy_weights needs destination_project_id, or session_id and model_seq_id")
    target = TinkerPath(model_id, source.kind, source.name)
    if svc.repo.run_by_id(model_id) is not None:
        if svc.checkpoints.exists(target) and (svc.checkpoints.find(tenant, target).get("meta") or {}) \
                .get("copied_from") == str(source):
            return {"tinker_path": str(target)}  # a retry of this very copy
        raise Conflict(f"training run {model_id} already exists; copy into another model_seq_id")
    files = svc.checkpoints.read_files(row)
    run = {"model_id": model_id, "tenant": tenant, "session_id": model_id.split(":")[0],
           "base_model": meta.get("base_model") or "", "lora": meta.get("lora_flags") or {"rank": 0},
           "user_metadata": {"copied_from": str(source)}, "created": t, "last_request": t}
    if new_session is not None:
        svc.repo.insert_finished_run(new_session, run)
    else:
        svc.repo.insert_run(run)
    meta.update(copied_from=str(source), tenant=tenant, time=t)
    meta.pop("revision_id", None)  # the copy is not a catalog revision of its own
    try:  # the blobs are the source's (content-addressed): only rows are new
        svc.checkpoints.write(tenant, target, files, meta, req.ttl_seconds, row.get("user_metadata"))
    except Exception:
        svc.repo.delete_run(tenant, model_id, new_session and new_session["session_id"])
        raise
    return {"tinker_path": str(target)}


def _copy_session_id(tenant: str, idem: str | None) -> str:
    """The session a project copy lands in: derived from the SDK's idempotency key, so a retry
    of the same call finds the copy it made instead of making another."""
    if not idem:
        return f"s-{uuid.uuid4().hex[:16]}"
    return "s-" + hashlib.sha256(f"copy\0{tenant}\0{idem}".encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- projects


def assign_project(svc: Any, tenant: str, session_id: str, project_id: str | None) -> dict[str, Any]:
    if not project_id:
        raise InvalidRequest("project_id is required (a session cannot be moved out of a project)")
    if not svc.repo.set_session_project(tenant, session_id, project_id):
        raise NotFound(f"session {session_id} not found")
    return {"session_id": session_id, "project_id": project_id}


# ---------------------------------------------------------------------- search


def search_sessions(svc: Any, tenant: str, req: s.SessionSearchRequest) -> dict[str, Any]:
    """One page, newest first, of the caller's sessions matching every filter."""
    kind = req.owner.get("type", "own")
    if kind == "user" and f"tml:tenant:{tenant}" not in req.owner.get("owner_urns", []) \
            and tenant not in req.owner.get("owner_urns", []):
        return {"sessions": [], "next_cursor": None}
    rows = svc.repo.tenant_sessions(tenant)
    if req.cursor is not None:
        after = (round(req.cursor.last_created_at.timestamp(), 6), req.cursor.last_session_id)
        rows = [r for r in rows if (round(r["created"], 6), r["session_id"]) < after]
    found: list[dict[str, Any]] = []
    for row in rows:
        if _matches(row, req):
            found.append(row)
            if len(found) > req.limit:
                break
    page, more = found[: req.limit], len(found) > req.limit
    cursor = None
    if more:
        last = page[-1]
        cursor = {"last_created_at": _iso(last["created"]), "last_session_id": last["session_id"]}
    totals = svc.repo.session_checkpoint_totals(tenant, [r["session_id"] for r in page])
    return {"sessions": [_summary(r, totals.get(r["session_id"], (0, 0))) for r in page],
            "next_cursor": cursor}


def _matches(row: dict[str, Any], req: s.SessionSearchRequest) -> bool:
    if req.session_id is not None or req.display_name is not None:
        by_id = req.session_id is not None and row["session_id"] == req.session_id
        name = (row["display_name"] or "").lower()
        by_name = req.display_name is not None and all(
            w in name for w in req.display_name.lower().split())
        if not (by_id or by_name):
            return False
    if req.project_ids is not None and (row["project_id"] or DEFAULT_PROJECT) not in req.project_ids:
        return False
    meta = {k: str(v) for k, v in (row["user_metadata"] or {}).items()}
    if any(meta.get(k) != v for k, v in req.user_metadata.items()):
        return False
    if req.statuses is not None:
        status = _status(row)
        if not any(_status_matches(status, q) for q in req.statuses):
            return False
    return True


def _status(row: dict[str, Any]) -> dict[str, Any] | None:
    finished = row["finished"]
    if finished is None:
        return {"type": "active"}
    if finished in CLIENT_REASONS:
        return {"type": "client_finished", "reason": {"type": finished}}
    return None  # ended without its client saying so (heartbeats stopped)


def _status_matches(status: dict[str, Any] | None, query: dict[str, Any]) -> bool:
    if status is None or status["type"] != query.get("type"):
        return False
    reasons = query.get("reasons")
    return not reasons or status.get("reason", {}).get("type") in reasons


def _summary(row: dict[str, Any], ckpts: tuple[int, int]) -> dict[str, Any]:
    return {
        "session_id": row["session_id"], "created_at": _iso(row["created"]),
        "owner": row["tenant"], "project_id": row["project_id"] or DEFAULT_PROJECT,
        "status": _status(row), "checkpoints_count": ckpts[0],
        "display_name": row["display_name"],
        "user_metadata": {k: str(v) for k, v in (row["user_metadata"] or {}).items()} or None,
        "checkpoint_storage_bytes": ckpts[1],
    }


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()
