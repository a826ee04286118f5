"""The FastAPI application: wiring, lifespan, error mapping, request logging.

`create_app(config)` loads the base models, starts one engine thread (`Runner`) per base and
mounts the Tinker API under `/api/v1` plus `/healthz`. Handlers stay async and thin; the
engines run in their own threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lorafleet.api.runner import Runner
from lorafleet.api.tinker.checkpoints import Checkpoints
from lorafleet.api.tinker.futures import FutureTable
from lorafleet.api.tinker.routes import router as tinker_router
from lorafleet.api.tinker.service import TinkerService
from lorafleet.api.tinker.store import TinkerStore
from lorafleet.api.tinker.tenancy import Tenancy
from lorafleet.config import Paths
from lorafleet.errors import InvalidRequest, LorafleetError

log = logging.getLogger("lorafleet.api")

# Request classes for the one-line-per-request log; polls and heartbeats log at DEBUG.
_QUIET = ("/api/v1/retrieve_future", "/api/v1/session_heartbeat", "/api/v1/telemetry",
          "/api/v1/client/dynamic_config", "/healthz")


@dataclass
class ServeConfig:
    """Settings of `lorafleet serve`.

    Args:
        bases: registered base model names to load (one engine thread each).
        paths: lorafleet home, catalog URL, store URL.
        auth: 'none' (one local tenant) or 'keys' (API keys from the catalog).
        dtype: base model dtype ('float32' or 'bfloat16').
        hold_s: how long retrieve_future holds a poll before answering try_again (SDK: 45 s timeout).
        gap_timeout_s: how long a missing seq_id blocks its model before it is skipped.
        state_dir: where the Tinker service keeps tinker.db and checkpoints (default home/tinker).
        threads: torch intra-op threads for the engines (0 = torch's default).
    """

    bases: list[str]
    paths: Paths
    auth: str = "none"
    dtype: str = "float32"
    hold_s: float = 30.0
    gap_timeout_s: float = 30.0
    state_dir: Path | None = None
    threads: int = 0
    max_sample_queue: int = 512
    engines: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # name -> (base, engine)


def build_service(cfg: ServeConfig) -> TinkerService:
    state_dir = cfg.state_dir or cfg.paths.home / "tinker"
    store = TinkerStore(state_dir / "tinker.db")
    futures = FutureTable(store, hold_s=cfg.hold_s)
    lost = futures.recover()
    if lost:
        log.warning("%d futures were lost by the last shutdown; they now report an error", lost)
    checkpoints = Checkpoints(store, state_dir / "checkpoints")
    runners: dict[str, Runner] = {}
    for name in cfg.bases:
        base, engine = cfg.engines.get(name) or _load(name, cfg)
        runners[name] = Runner(engine, base, futures, store, checkpoints,
                               gap_timeout_s=cfg.gap_timeout_s,
                               max_sample_queue=cfg.max_sample_queue)
    return TinkerService(runners, store, futures, checkpoints)


def _load(name: str, cfg: ServeConfig) -> tuple[Any, Any]:
    from lorafleet.engine import Engine
    from lorafleet.model import load_base

    base = load_base(name, cfg.paths, dtype=cfg.dtype)
    return base, Engine(base)


def create_app(cfg: ServeConfig, service: TinkerService | None = None) -> FastAPI:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    svc = service or build_service(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.futures.bind_loop(asyncio.get_running_loop())
        for r in svc.runners.values():
            r.start()
        janitor = asyncio.create_task(_janitor(svc))
        try:
            yield
        finally:
            janitor.cancel()
            for r in svc.runners.values():
                await asyncio.to_thread(r.stop)

    app = FastAPI(title="lorafleet", lifespan=lifespan)
    app.state.tinker = svc
    app.state.tenancy = Tenancy(cfg.auth)
    app.state.url_secret = secrets.token_bytes(32)
    install_errors(app)
    app.middleware("http")(_log_requests)
    app.include_router(tinker_router)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "bases": sorted(svc.runners)}

    return app


async def _janitor(svc: TinkerService, every_s: float = 30.0) -> None:
    """Retention: expire delivered futures and checkpoints past their TTL."""
    while True:
        await asyncio.sleep(every_s)
        try:
            svc.futures.expire()
            svc.checkpoints.gc_expired()
        except Exception:
            log.exception("janitor failed")


async def _log_requests(request: Request, call_next):
    t0 = time.perf_counter()
    response = await call_next(request)
    level = logging.DEBUG if request.url.path.startswith(_QUIET) else logging.INFO
    log.log(level, "%s %s -> %d in %.1f ms", request.method, request.url.path,
            response.status_code, (time.perf_counter() - t0) * 1000)
    return response


def install_errors(app: FastAPI) -> None:
    """Map lorafleet errors to HTTP: `lorafleet.api.errors` when present (the one map)."""
    try:
        from lorafleet.api.errors import install  # type: ignore[import-not-found]
    except ImportError:
        install = _fallback_install
    install(app)

    @app.exception_handler(RequestValidationError)
    async def _bad_params(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _handle(request, InvalidRequest(f"invalid request parameters: {exc.errors()}"))


async def _handle(request: Request, exc: LorafleetError) -> JSONResponse:
    handler = request.app.exception_handlers.get(type(exc)) or request.app.exception_handlers.get(
        LorafleetError
    )
    return await handler(request, exc)


def _fallback_install(app: FastAPI) -> None:  # pragma: no cover - replaced by api/errors.py
    from lorafleet import errors as e

    status = {e.InvalidRequest: 400, e.Unauthorized: 401, e.NotFound: 404, e.Expired: 410,
              e.Conflict: 422, e.NoCapacity: 429, e.Corrupt: 500, e.LorafleetError: 500}

    @app.exception_handler(e.LorafleetError)
    async def handle(_: Request, exc: e.LorafleetError) -> JSONResponse:
        code = next(status[c] for c in type(exc).__mro__ if c in status)
        headers = {}
        if isinstance(exc, e.NoCapacity):
            headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
        return JSONResponse({"detail": str(exc)}, status_code=code, headers=headers)
