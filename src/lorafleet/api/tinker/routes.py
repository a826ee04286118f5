"""HTTP routes of the Tinker API (`/api/v1`): parse, call `TinkerService`, answer.

Thin by design: no status codes are chosen here (errors are raised as `lorafleet.errors`
types and mapped in `api/errors.py`), and no tensors are touched.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import logging
import tarfile
import time
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from lorafleet.api.auth import tenant as _tenant
from lorafleet.api.checks import refuse_nul_params
from lorafleet.api.tinker import schemas as s
from lorafleet.api.tinker import wire
from lorafleet.api.tinker.checkpoints import parse_path
from lorafleet.api.tinker.encryption import downloadable
from lorafleet.api.tinker.futures import DONE, NOT_FINITE, PROTO_TYPE
from lorafleet.api.tinker.service import SAFE_CLIENT_CONFIG, TinkerService
from lorafleet.api.tinker.signing import sign, verify
from lorafleet.errors import InvalidRequest, NotFound

router = APIRouter(prefix="/api/v1", dependencies=[Depends(refuse_nul_params)])
log = logging.getLogger("lorafleet.tinker")
URL_TTL_S = 3600
# listing pages: out-of-range values are a 400 naming the bound, never a database overflow
Limit = Annotated[int, Query(ge=0, le=10_000)]
Offset = Annotated[int, Query(ge=0, le=(1 << 63) - 1)]
ARCHIVE_NAME = "archive.tar"


def _svc(request: Request) -> TinkerService:
    return request.app.state.tinker


def _idem(request: Request) -> str | None:
    return request.headers.get("x-idempotency-key")


def sdk_version(request: Request) -> tuple[int, ...]:
    """The caller's tinker SDK version from its Stainless headers; (99,) when unknown."""
    raw = request.headers.get("x-stainless-package-version") or ""
    if not raw:
        ua = request.headers.get("user-agent", "")
        raw = ua.rsplit(" ", 1)[-1] if ua.startswith("AsyncTinker/") else ""
    try:
        return tuple(int(x) for x in raw.split(".")[:3])
    except ValueError:
        return (99,)


def _checkpoint_kinds(request: Request) -> set[str]:
    """SDKs before 0.38 reject the `external` checkpoint type in listings."""
    kinds = {"training", "sampler"}
    if sdk_version(request) >= (0, 38):
        kinds.add("external")
    return kinds


def _doc(model: type[s.Wire] | None) -> dict:
    """OpenAPI of a body these routes read themselves (so FastAPI cannot see it): the model's
    JSON schema with its definitions inlined, or (None) any JSON object."""
    schema = {"type": "object"} if model is None else _inline(model.model_json_schema())
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _inline(schema: dict) -> dict:
    defs = schema.pop("$defs", {})

    def walk(x):
        if isinstance(x, dict):
            if "$ref" in x:
                return walk(defs[x["$ref"].rsplit("/", 1)[-1]])
            return {k: walk(v) for k, v in x.items()}
        return [walk(v) for v in x] if isinstance(x, list) else x

    return walk(schema)


_TENSOR = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "array", "items": {"type": "number"}},
    "dtype": {"enum": ["float32", "int64"]}, "shape": {"type": "array", "items": {"type": "integer"}}}}
_FWDBWD_JSON = {"type": "object", "required": ["model_id", "seq_id", "forward_backward_input"], "properties": {
    "model_id": {"type": "string"}, "seq_id": {"type": "integer", "minimum": 1},
    "forward_backward_input": {"type": "object", "required": ["data"], "properties": {
        "loss_fn": {"type": "string"},
        "loss_fn_config": {"type": "object", "additionalProperties": {"type": "number"}},
        "data": {"type": "array", "items": {"type": "object", "properties": {
            "model_input": {"type": "object"},
            "loss_fn_inputs": {"type": "object", "additionalProperties": _TENSOR}}}}}}}}
# forward_backward and forward take the JSON form or the SDK's protobuf (api/tinker/wire.py)
FWDBWD_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _FWDBWD_JSON},
    PROTO_TYPE: {"schema": {"type": "string", "format": "binary"}}}}}


async def _body(request: Request, model: type[s.M]) -> s.M:
    """The body as `model`, parsed in a worker thread: up to --max-body-bytes of JSON must not
    hold up the event loop."""
    return await asyncio.to_thread(s.parse, await request.body(), model)


# ---------------------------------------------------------------------- bootstrap


@router.post("/client/config", openapi_extra=_doc(s.ClientConfigRequest))
async def client_config(request: Request) -> dict:
    await _body(request, s.ClientConfigRequest)
    _tenant(request)
    return dict(SAFE_CLIENT_CONFIG)


@router.post("/client/dynamic_config")
async def dynamic_config(request: Request) -> dict:
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}


@router.post("/create_session", openapi_extra=_doc(s.CreateSessionRequest))
async def create_session(request: Request) -> dict:
    req = await _body(request, s.CreateSessionRequest)
    return _svc(request).create_session(_tenant(request), req)


@router.post("/session_heartbeat", openapi_extra=_doc(s.SessionRef))
async def session_heartbeat(request: Request) -> dict:
    req = await _body(request, s.SessionRef)
    return _svc(request).heartbeat(_tenant(request), req.session_id)


@router.post("/sessions/{session_id}/finish", openapi_extra=_doc(s.FinishRequest))
async def finish_session(session_id: str, request: Request) -> dict:
    req = await _body(request, s.FinishRequest)
    reason = (req.reason or {}).get("type", "success")
    _svc(request).finish_session(_tenant(request), session_id, reason)
    return {"type": "session_finished"}


@router.post("/telemetry", openapi_extra=_doc(None))
async def telemetry(request: Request) -> dict:
    """SDK telemetry batches: accepted; client-side errors are worth a log line."""
    tenant = _tenant(request)
    try:
        events = (await asyncio.to_thread(s.parse_json, await request.body())).get("events") or []
    except InvalidRequest:
        events = []
    for e in events:
        if isinstance(e, dict) and e.get("severity") in ("ERROR", "CRITICAL"):
            log.info("client error reported by %s: %s %s", tenant, e.get("event"),
                     str(e.get("event_data") or e.get("error_message") or "")[:300])
    return {"status": "accepted"}


# ---------------------------------------------------------------------- training


@router.post("/create_model", openapi_extra=_doc(s.CreateModelRequest))
async def create_model(request: Request) -> dict:
    req = await _body(request, s.CreateModelRequest)
    return _svc(request).create_model(_tenant(request), req, _idem(request)).to_json()


@router.post("/get_info", openapi_extra=_doc(s.ModelRef))
async def get_info(request: Request) -> dict:
    req = await _body(request, s.ModelRef)
    return _svc(request).get_info(_tenant(request), req.model_id)


def _decode_fwdbwd(body: bytes, protobuf: bool, forward_only: bool | None) -> wire.FwdBwdCall:
    if protobuf:
        return wire.decode_forward_backward(body, forward_only)
    return wire.decode_forward_backward_json(s.parse_json(body), bool(forward_only))


async def _fwdbwd(request: Request, forward_only: bool | None) -> dict:
    if request.headers.get("content-encoding", "identity") not in ("identity", ""):
        raise InvalidRequest("compressed forward_backward bodies are not supported")
    body = await request.body()
    protobuf = "protobuf" in request.headers.get("content-type", "")
    # decoding up to --max-body-bytes of tensors takes a while: off the event loop
    call = await asyncio.to_thread(_decode_fwdbwd, body, protobuf, forward_only)
    return _svc(request).forward_backward(_tenant(request), call, _idem(request)).to_json()


@router.post("/forward_backward", openapi_extra=FWDBWD_DOC)
async def forward_backward(request: Request) -> dict:
    return await _fwdbwd(request, None)


@router.post("/forward", openapi_extra=FWDBWD_DOC)
async def forward(request: Request) -> dict:
    return await _fwdbwd(request, True)


@router.post("/optim_step", openapi_extra=_doc(s.OptimStepRequest))
async def optim_step(request: Request) -> dict:
    req = await _body(request, s.OptimStepRequest)
    return _svc(request).optim_step(_tenant(request), req, _idem(request)).to_json()


@router.post("/save_weights", openapi_extra=_doc(s.SaveWeightsRequest))
async def save_weights(request: Request) -> dict:
    req = await _body(request, s.SaveWeightsRequest)
    return _svc(request).save_weights(_tenant(request), req, _idem(request)).to_json()


@router.post("/save_weights_for_sampler", openapi_extra=_doc(s.SaveWeightsForSamplerRequest))
async def save_weights_for_sampler(request: Request) -> dict:
    req = await _body(request, s.SaveWeightsForSamplerRequest)
    return _svc(request).save_weights_for_sampler(_tenant(request), req, _idem(request)).to_json()


@router.post("/save_weights_external", openapi_extra=_doc(s.SaveWeightsExternalRequest))
async def save_weights_external(request: Request) -> dict:
    req = await _body(request, s.SaveWeightsExternalRequest)
    return _svc(request).save_weights_external(_tenant(request), req, _idem(request)).to_json()


@router.post("/load_weights", openapi_extra=_doc(s.LoadWeightsRequest))
async def load_weights(request: Request) -> dict:
    req = await _body(request, s.LoadWeightsRequest)
    return _svc(request).load_weights(_tenant(request), req, _idem(request)).to_json()


# ---------------------------------------------------------------------- sampling


@router.post("/create_sampling_session", openapi_extra=_doc(s.CreateSamplingSessionRequest))
async def create_sampling_session(request: Request) -> dict:
    req = await _body(request, s.CreateSamplingSessionRequest)
    return _svc(request).create_sampling_session(_tenant(request), req)


@router.get("/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, request: Request) -> dict:
    return _svc(request).get_sampler(_tenant(request), sampler_id)


@router.post("/asample", openapi_extra=_doc(s.SampleRequest))
async def asample(request: Request) -> dict:
    req = await _body(request, s.SampleRequest)
    return _svc(request).sample(_tenant(request), req, _idem(request)).to_json()


# ---------------------------------------------------------------------- futures


@router.post("/retrieve_future", openapi_extra=_doc(s.RetrieveFutureRequest))
async def retrieve_future(request: Request) -> Response:
    req = await _body(request, s.RetrieveFutureRequest)
    futures = _svc(request).futures
    result = await futures.wait(req.request_id, _tenant(request))
    if result is None:
        return JSONResponse({"type": "try_again", "request_id": req.request_id,
                             "queue_state": "active"})
    if result.state != DONE:
        return JSONResponse({"error": result.error, "category": result.category or "unknown"})
    if result.content_type == PROTO_TYPE:
        if "protobuf" in request.headers.get("accept", ""):
            return Response(result.payload, media_type=PROTO_TYPE)
        convert = wire.sample_proto_to_json if result.kind == "sample" else wire.fwdbwd_proto_to_json
        try:  # strict JSON: a non-finite value (weights gone NaN) is the caller's error
            return Response(json.dumps(convert(result.payload or b""), allow_nan=False),
                            media_type="application/json")
        except ValueError:
            return JSONResponse({"error": NOT_FINITE, "category": "user"})
    return Response(result.payload, media_type="application/json")


# ---------------------------------------------------------------------- REST


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/get_server_capabilities")
async def capabilities(request: Request) -> dict:
    return _svc(request).capabilities()


@router.get("/training_runs")
async def training_runs(request: Request, limit: Limit = 20, offset: Offset = 0) -> dict:
    return _svc(request).training_runs(_tenant(request), limit, offset)


@router.get("/training_runs/{model_id}")
async def training_run(model_id: str, request: Request) -> dict:
    return _svc(request).training_run(_tenant(request), model_id)


@router.get("/training_runs/{model_id}/checkpoints")
async def run_checkpoints(model_id: str, request: Request) -> dict:
    return _svc(request).list_checkpoints(_tenant(request), model_id,
                                          kinds=_checkpoint_kinds(request))


@router.get("/checkpoints")
async def all_checkpoints(request: Request, limit: Limit = 100, offset: Offset = 0) -> dict:
    return _svc(request).list_checkpoints(_tenant(request), None, limit, offset,
                                          kinds=_checkpoint_kinds(request))


@router.delete("/training_runs/{model_id}/checkpoints/{kind}/{name}")
async def delete_checkpoint(model_id: str, kind: str, name: str, request: Request) -> dict:
    svc = _svc(request)
    svc.delete_checkpoint(_tenant(request), svc.checkpoint_path(model_id, f"{kind}/{name}"))
    return {"deleted": True}


@router.post("/training_runs/{model_id}/checkpoints/{kind}/{name}/publish")
async def publish(model_id: str, kind: str, name: str, request: Request) -> dict:
    svc = _svc(request)
    svc.checkpoints.set_public(_tenant(request), svc.checkpoint_path(model_id, f"{kind}/{name}"), True)
    return {"public": True}


@router.delete("/training_runs/{model_id}/checkpoints/{kind}/{name}/publish")
async def unpublish(model_id: str, kind: str, name: str, request: Request) -> dict:
    svc = _svc(request)
    svc.checkpoints.set_public(_tenant(request), svc.checkpoint_path(model_id, f"{kind}/{name}"), False)
    return {"public": False}


@router.put("/training_runs/{model_id}/checkpoints/{kind}/{name}/ttl", openapi_extra=_doc(s.TtlRequest))
async def set_ttl(model_id: str, kind: str, name: str, request: Request) -> dict:
    req = await _body(request, s.TtlRequest)
    svc = _svc(request)
    svc.checkpoints.set_ttl(_tenant(request), svc.checkpoint_path(model_id, f"{kind}/{name}"),
                            req.ttl_seconds)
    return {"ttl_seconds": req.ttl_seconds}


def _signed_url(request: Request, path: str, filename: str, expires: int) -> str:
    """A URL on this server that serves one checkpoint file until `expires`, without a key."""
    token = base64.urlsafe_b64encode(path.encode()).decode().rstrip("=")
    sig = sign(request.app.state.url_secret, f"{token}/{expires}/{filename}")
    return f"{str(request.base_url).rstrip('/')}/api/v1/files/{token}/{expires}/{sig}/{filename}"


def _downloadable(request: Request, model_id: str, kind: str, name: str) -> dict:
    svc = _svc(request)
    path = parse_path(svc.checkpoint_path(model_id, f"{kind}/{name}"))
    row = svc.find_checkpoint(_tenant(request), path)
    if row["kind"] not in ("external", "training"):
        raise InvalidRequest("only weights/ and external_weights/ checkpoints can be downloaded")
    return row


@router.get("/training_runs/{model_id}/checkpoints/{kind}/{name}/external_weights_urls")
async def external_weights_urls(model_id: str, kind: str, name: str, request: Request) -> dict:
    row = _downloadable(request, model_id, kind, name)
    expires = int(time.time()) + URL_TTL_S
    urls = {name: _signed_url(request, row["tinker_path"], name, expires)
            for name in _svc(request).checkpoints.file_names(row) if downloadable(name, row.get("meta"))}
    return {"urls": urls, "expires": datetime.fromtimestamp(expires, UTC).isoformat()}


@router.get("/training_runs/{model_id}/checkpoints/{kind}/{name}/archive")
async def checkpoint_archive(model_id: str, kind: str, name: str, request: Request) -> Response:
    """SDK <= 0.2x download: 302 to a signed URL of a tar of the PEFT files (+ marker)."""
    row = _downloadable(request, model_id, kind, name)
    expires = int(time.time()) + URL_TTL_S
    return Response(status_code=302, headers={
        "Location": _signed_url(request, row["tinker_path"], ARCHIVE_NAME, expires),
        "Expires": email.utils.formatdate(expires, usegmt=True),
    })


@router.get("/files/{token}/{expires}/{signature}/{filename}")
async def download_file(token: str, expires: int, signature: str, filename: str,
                        request: Request) -> Response:
    """A signed, expiring file URL: needs no API key (like the official service's URLs)."""
    if not verify(request.app.state.url_secret, f"{token}/{expires}/{filename}", signature) \
            or expires < time.time():
        raise NotFound("this download link is invalid or expired")
    path = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    checkpoints = _svc(request).checkpoints
    row = checkpoints.repo.checkpoint(str(parse_path(path)))
    if row is None:
        raise NotFound("checkpoint not found")
    if filename == ARCHIVE_NAME:
        files = await asyncio.to_thread(checkpoints.read_files, row)
        return Response(_tar(files), media_type="application/x-tar")
    data = await asyncio.to_thread(checkpoints.read_file, row, filename)
    if data is None:
        raise NotFound("file not found")
    return Response(data, media_type="application/octet-stream")


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        marker = tarfile.TarInfo("checkpoint_complete")
        tar.addfile(marker, io.BytesIO(b""))
    return buf.getvalue()


@router.post("/weights_info", openapi_extra=_doc(s.WeightsInfoRequest))
async def weights_info(request: Request) -> dict:
    req = await _body(request, s.WeightsInfoRequest)
    return _svc(request).weights_info(_tenant(request), req.tinker_path)


@router.get("/sessions")
async def sessions(request: Request, limit: Limit = 20, offset: Offset = 0) -> dict:
    return _svc(request).sessions(_tenant(request), limit, offset)


@router.get("/sessions/{session_id}")
async def session(session_id: str, request: Request) -> dict:
    return _svc(request).session(_tenant(request), session_id)
