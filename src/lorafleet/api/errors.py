"""The one map from lorafleet.errors to HTTP status codes and bodies.

Permanent failures are 4xx that the Tinker SDK does not retry (400/401/403/404/410/413/422);
only transient ones are retryable: NoCapacity 429 and Unavailable (a dead engine actor, or the
vLLM sampler restarting) 503, both with Retry-After. Unexpected exceptions stay 500; their
text (which may hold SQL, parameters, paths) never reaches a client: `internal_error` logs the
traceback under an error id and clients see only "internal error <id>; see server log" (in
500 bodies and in failed futures). Request-validation failures from FastAPI/pydantic become
400 with a readable message. Routes never build an HTTPException: they raise lorafleet errors
and `install` maps them.
"""

from __future__ import annotations

import logging
import math
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lorafleet.errors import (
    Conflict, Corrupt, Expired, Forbidden, InvalidRequest, LorafleetError, NoCapacity, NotFound,
    QuotaExceeded, TooLarge, Unauthorized, Unavailable,
)

log = logging.getLogger(__name__)

STATUS: dict[type[LorafleetError], int] = {
    InvalidRequest: 400,
    Unauthorized: 401,
    Forbidden: 403,
    QuotaExceeded: 403,
    TooLarge: 413,
    NotFound: 404,
    Expired: 410,
    Conflict: 422,
    NoCapacity: 429,
    Unavailable: 503,
    Corrupt: 500,
    LorafleetError: 500,
}


def internal_error(exc: BaseException, what: str) -> str:
    """Log an unexpected exception with its traceback; return the message a client may see."""
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s", error_id, what, exc_info=exc)
    return f"internal error {error_id}; see server log"


def client_message(exc: BaseException, what: str) -> str:
    """A lorafleet error's own message; for anything else, the logged `internal_error`."""
    return str(exc) if isinstance(exc, LorafleetError) else internal_error(exc, what)


def status_for(exc: LorafleetError) -> int:
    return next(STATUS[c] for c in type(exc).__mro__ if c in STATUS)


OPENAI_PREFIXES = ("/v1/", "/oai/api/v1/")  # the OpenAI-compatible paths (api/app.py mounts both)
# OpenAI's error `type` per status, for the /v1 (OpenAI-compatible) paths
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "invalid_request_error",
                410: "not_found_error", 422: "invalid_request_error", 429: "rate_limit_error",
                503: "service_unavailable"}


def error_response(exc: LorafleetError, path: str = "") -> JSONResponse:
    status = status_for(exc)
    headers = {}
    if isinstance(exc, NoCapacity | Unavailable):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    if status >= 500:
        log.error("%s: %s", type(exc).__name__, exc)
    return JSONResponse(body(str(exc), type(exc).__name__, status, path), status_code=status, headers=headers)


def body(message: str, name: str, status: int, path: str = "") -> dict:
    """The error body: OpenAI's shape on /v1 paths (what the openai SDK reads), ours elsewhere."""
    if path.startswith(OPENAI_PREFIXES):
        return {"error": {"message": message, "type": OPENAI_TYPES.get(status, "server_error"),
                          "param": None, "code": name}}
    return {"detail": message, "error": name}


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def install(app: FastAPI) -> None:
    """Register the handlers on `app`."""

    @app.exception_handler(LorafleetError)
    async def _lorafleet(request: Request, exc: LorafleetError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        message = internal_error(exc, f"{request.method} {request.url.path}")
        return JSONResponse(body(message, "InternalError", 500, request.url.path), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(body(validation_message(exc), "InvalidRequest", 400, request.url.path), status_code=400)
