"""HTTP routes added after the core Tinker protocol (thin, like routes.py): tinker SDK 0.38's
session and copy calls, and MinT's extensions. The work is in `sessions_ext.py`, `trace.py`
and `mint.py`; status codes come from `api/errors.py`."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from fastapi import APIRouter, Depends, Request, Response

from lorafleet.api.auth import tenant as _tenant
from lorafleet.api.checks import refuse_nul_params
from lorafleet.api.tinker import ext_schemas as x
from lorafleet.api.tinker import distill, mint, sessions_ext, trace
from lorafleet.api.tinker import schemas as s
from lorafleet.api.tinker.routes import FWDBWD_DOC, URL_TTL_S, _body, _doc, _idem, _svc
from lorafleet.api.tinker.signing import sign, verify
from lorafleet.errors import NotFound

router = APIRouter(prefix="/api/v1", dependencies=[Depends(refuse_nul_params)])
TRACE_NAME = "session.pftrace"


# ---------------------------------------------------------------------- SDK 0.38


@router.post("/copy_weights", openapi_extra=_doc(x.CopyWeightsRequest))
async def copy_weights(request: Request) -> dict:
    req = await _body(request, x.CopyWeightsRequest)
    if req.weights_access_token is None:
        req.weights_access_token = request.headers.get("x-tinker-weights-access-token")
    return await asyncio.to_thread(sessions_ext.copy_weights, _svc(request), _tenant(request), req,
                                   _idem(request))


@router.post("/sessions/search", openapi_extra=_doc(x.SessionSearchRequest))
async def search_sessions(request: Request) -> dict:
    req = await _body(request, x.SessionSearchRequest)
    return sessions_ext.search_sessions(_svc(request), _tenant(request), req)


@router.put("/sessions/{session_id}/project", openapi_extra=_doc(x.ProjectRequest))
async def assign_session_project(session_id: str, request: Request) -> dict:
    req = await _body(request, x.ProjectRequest)
    return sessions_ext.assign_project(_svc(request), _tenant(request), session_id, req.project_id)


@router.get("/sessions/{session_id}/trace_export")
async def trace_export(session_id: str, request: Request) -> dict:
    """Poll of the trace export: always ready (the trace is built when its URL is fetched)."""
    _svc(request).session_row(_tenant(request), session_id)
    expires = int(time.time()) + URL_TTL_S
    sig = sign(request.app.state.url_secret, f"trace/{session_id}/{expires}")
    url = f"{str(request.base_url).rstrip('/')}/api/v1/files/trace/{session_id}/{expires}/{sig}/{TRACE_NAME}"
    return {"status": "ready", "url": url,
            "expires": datetime.fromtimestamp(expires, UTC).isoformat()}


@router.get("/files/trace/{session_id}/{expires}/{signature}/" + TRACE_NAME)
async def trace_file(session_id: str, expires: int, signature: str, request: Request) -> Response:
    """A signed, expiring trace URL (no API key, like the checkpoint file URLs)."""
    if not verify(request.app.state.url_secret, f"trace/{session_id}/{expires}", signature) \
            or expires < time.time():
        raise NotFound("this download link is invalid or expired")
    svc = _svc(request)
    row = svc.repo.session_by_id(session_id)
    if row is None:
        raise NotFound("session not found")
    data = await asyncio.to_thread(trace.session_trace, svc, row["tenant"], session_id)
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{session_id}.pftrace"'})


# ---------------------------------------------------------------------- MinT


@router.post("/mint/checkpoints/interpolate", openapi_extra=_doc(x.InterpolateRequest))
async def interpolate(request: Request) -> dict:
    req = await _body(request, x.InterpolateRequest)
    return await asyncio.to_thread(mint.interpolate, _svc(request), _tenant(request), req)


@router.post("/mint/forward_backward_reverse_kl", openapi_extra=_doc(x.ReverseKLRequest))
async def forward_backward_reverse_kl(request: Request) -> dict:
    """Scores the completions with the reference (awaited), then queues the student's step."""
    body = await asyncio.to_thread(s.parse_json, await request.body())
    return (await distill.reverse_kl(_svc(request), _tenant(request), body, _idem(request))).to_json()


@router.post("/train_step", openapi_extra=FWDBWD_DOC)
async def train_step(request: Request) -> dict:
    body = await asyncio.to_thread(s.parse_json, await request.body())
    return mint.train_step(_svc(request), _tenant(request), body, _idem(request)).to_json()


UPLOAD_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}, "base_model": {"type": "string"},
        "name": {"type": "string"}}}},
    "application/gzip": {"schema": {"type": "string", "format": "binary"}}}}}


@router.post("/checkpoints/upload", openapi_extra=UPLOAD_DOC)
async def upload_checkpoint(request: Request) -> dict:
    """A `.tar.gz` checkpoint archive (multipart `file` field, or the raw body); `base_model`
    and `name` as form fields or query parameters."""
    from lorafleet.api.tinker.upload import archive_bytes

    tenant = _tenant(request)
    data, fields = await asyncio.to_thread(archive_bytes, await request.body(),
                                           request.headers.get("content-type", ""))
    base = fields.get("base_model") or request.query_params.get("base_model")
    name = fields.get("name") or request.query_params.get("name")
    return await asyncio.to_thread(mint.upload, _svc(request), tenant, data, base, name)
