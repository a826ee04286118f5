"""The FastAPI application: wiring, lifespan, error mapping, request logging.

`create_app(config)` loads the base models, starts one engine scheduler per base
(engine/scheduler.py: a compute thread and an I/O worker) and mounts the Tinker API under
`/api/v1` plus `/healthz` (503 when an engine thread is dead or stalled) and `/readyz` (503
until the engines run and the app serves, and again once shutdown begins). Handlers stay
async and thin; the engines run in their own threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request, Response

from lorafleet.api.edge import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_JSON_BYTES, Edge
from lorafleet.api.errors import install as install_errors
from lorafleet.api.tinker.catalog_bridge import CatalogBridge
from lorafleet.api.tinker.ext_routes import router as tinker_ext_router
from lorafleet.api.tinker.routes import router as tinker_router
from lorafleet.api.tinker.service import TinkerService
from lorafleet.api.tinker.state import open_state
from lorafleet.config import Paths
from lorafleet.engine.decode import Budgets
from lorafleet.engine.scheduler import Scheduler

log = logging.getLogger("lorafleet.api")
# after SIGTERM, how long uvicorn waits for open responses (Tinker long polls, streams that are
# not reading) before it cancels them; streams themselves end at once (begin_shutdown)
GRACEFUL_SHUTDOWN_S = 10
OAI_PREFIX = "/oai/api"  # + the OpenAI router's /v1: where hosted Tinker serves that API

# Request classes for the one-line-per-request log; polls and heartbeats log at DEBUG.
_QUIET = ("/api/v1/retrieve_future", "/api/v1/session_heartbeat", "/api/v1/telemetry",
          "/api/v1/client/dynamic_config", "/health", "/readyz")  # and /healthz


@dataclass
class ServeConfig:
    """Settings of `lorafleet serve`.

    Args:
        bases: registered base model names to load (one engine thread each).
        paths: lorafleet home, catalog URL, store URL.
        auth: 'none' (one local tenant, loopback Host/Origin only) or 'keys' (API keys from
            the catalog); see api/auth.py.
        max_body_bytes: the largest body of forward_backward and adapter uploads (413 beyond it).
        max_json_bytes: the largest body of every other route (see api/edge.py).
        dtype: base model dtype ('float32' or 'bfloat16').
        device: where the engines compute ('cpu', 'cuda', 'cuda:1').
        cpu_prepack: on CPU, batched inference reads oneDNN-packed base weights (engine/prepack.py).
        max_num_seqs / max_num_batched_tokens / kv_cache_bytes: sampling budgets per engine
            (engine/decode.py `Budgets`); micro_batch_tokens: training tokens per iteration.
        hold_s: how long retrieve_future holds a poll before answering try_again (SDK: 45 s timeout).
        gap_timeout_s: how long a missing seq_id blocks its model before it is skipped.
        state_dir: where servers before catalog migration 0004 kept the Tinker state (tinker.db,
            checkpoints/; default home/tinker): a server refuses to start while one is there.
            The state itself lives in the catalog's database and store (api/tinker/state.py).
        threads: torch intra-op threads for the engines (0 = torch's default).
        stall_s: /healthz fails when an engine has had pending work but made no progress (a
            loop turn or a decode step) for this long.
        ray_engines: engine actors per base on Ray (0: one engine per base in this process);
            engine_threads: torch threads of each; ray_address: join this Ray cluster instead
            of starting a local runtime (see lorafleet/fleet/, docs/scale-out.md).
    """

    bases: list[str]
    paths: Paths
    auth: str = "none"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES
    dtype: str = "float32"
    device: str = "cpu"
    cpu_prepack: bool = True
    hold_s: float = 30.0
    gap_timeout_s: float = 30.0
    state_dir: Path | None = None
    threads: int = 0
    stall_s: float = 300.0
    max_sample_queue: int = 512
    session_timeout_s: float = 900.0  # no heartbeat for this long ends a session
    use_catalog: bool = True  # publish runs and checkpoints into the catalog, serve its routes
    max_slots: int = 64  # live adapters per engine (residency slot tier)
    max_host_adapters: int | None = 512  # host-memory adapter cache, in adapters ...
    max_host_bytes: int | None = None  # ... and/or in bytes
    load_queue: int = 64  # cold loads waiting or running at most; more misses get 429
    load_batch: int = 8  # cold loads fetched together
    max_num_seqs: int = 64  # rows decoding at once per engine
    max_num_batched_tokens: int = 1024  # tokens per decode step (decode rows + prefill chunks)
    kv_cache_bytes: int = 2 << 30  # KV cache of one engine's running batch; more preempts rows
    micro_batch_tokens: int = 1024  # training tokens per scheduler iteration (between decode steps)
    boundary_only: bool = False  # admit sampling work only at batch boundaries (benchmark baseline)
    # per-tenant quota defaults (None: unlimited); a tenant's own values win (keys create --max-*)
    max_runs: int | None = None
    max_queued: int | None = None
    max_adapters: int | None = None
    # folders POST /v1/load_lora_adapter may read `lora_path` from (none: loading by path is off)
    lora_roots: tuple[Path, ...] = ()
    engines: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # name -> (base, engine)
    ray_engines: int = 0
    engine_threads: int = 1
    ray_address: str | None = None
    sampler: str = "engine"  # where sampling runs: lorafleet's engine, or "vllm" (docs/vllm.md)
    vllm: Any = None  # engine/vllm `VllmSettings` with sampler="vllm" (None: the defaults)


def build_service(cfg: ServeConfig, metrics: Any = None) -> TinkerService:
    from lorafleet.catalog.records import Quotas
    from lorafleet.catalog.service import Catalog

    # the Tinker state lives in the catalog's database and store, shared by every server on them
    catalog = Catalog.open(cfg.paths.database_url, cfg.paths.store_url)
    state = open_state(catalog, cfg.state_dir or cfg.paths.home / "tinker", hold_s=cfg.hold_s)
    defaults = Quotas(cfg.max_runs, cfg.max_queued, cfg.max_adapters)
    bridge, quotas = None, lambda tenant: defaults
    if cfg.use_catalog:
        bridge = CatalogBridge(catalog)
        bridge.catalog.default_quotas = defaults
        quotas = bridge.catalog.quotas_for
    runners: dict[str, Scheduler] = {}
    budgets = Budgets(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                      kv_cache_bytes=cfg.kv_cache_bytes, boundary_only=cfg.boundary_only)
    for name in cfg.bases:
        if cfg.ray_engines or cfg.ray_address:
            runners[name] = _fleet(name, cfg, metrics)
            continue
        base, engine = cfg.engines.get(name) or _load(name, cfg)
        kw = dict(budgets=budgets, gap_timeout_s=cfg.gap_timeout_s, max_sample_queue=cfg.max_sample_queue,
                  micro_batch_tokens=cfg.micro_batch_tokens, metrics=metrics)
        if cfg.sampler == "vllm":
            runners[name] = _vllm_runner(engine, base, bridge, cfg, kw)
        else:
            runners[name] = Scheduler(engine, base, residency=_residency(engine, bridge, metrics, cfg), **kw)
    return TinkerService(runners, state, catalog=bridge, quotas=quotas)


def _vllm_runner(engine: Any, base: Any, bridge: CatalogBridge | None, cfg: ServeConfig,
                 kw: dict[str, Any]) -> Any:
    """`--sampler vllm`: the engine trains, a vLLM child process samples (engine/vllm/)."""
    from lorafleet.engine.vllm import VllmSettings, vllm_scheduler

    return vllm_scheduler(
        engine, base, fetch_many=None if bridge is None else _fetch_many(bridge),
        settings=cfg.vllm or VllmSettings(), root=cfg.paths.home / "vllm", device=cfg.device,
        max_slots=cfg.max_slots, max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
        residency_kw=dict(max_host_adapters=cfg.max_host_adapters, max_host_bytes=cfg.max_host_bytes,
                          max_queue=cfg.load_queue, load_batch=cfg.load_batch), **kw)


def _residency(engine: Any, bridge: CatalogBridge | None, metrics: Any, cfg: ServeConfig) -> Any:
    """Slots / host cache / cold loader of one engine: catalog revisions and sampler versions."""
    if bridge is None:
        return None
    from lorafleet.engine.residency import Residency

    return Residency(engine, _fetch_many(bridge), max_slots=cfg.max_slots, max_host_adapters=cfg.max_host_adapters,
                     max_host_bytes=cfg.max_host_bytes, max_queue=cfg.load_queue,
                     load_batch=cfg.load_batch, metrics=metrics)


def _fetch_many(bridge: CatalogBridge) -> Any:
    """Cold loads from the catalog's store: revision ids -> {id: LoraWeights | Exception}."""
    from lorafleet.catalog.records import ADMIN
    from lorafleet.lora import io as lora_io

    def fetch_many(keys: list[Any]) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key in keys:
            try:
                out[key] = lora_io.parse_peft_files(bridge.catalog.read_files(ADMIN, key)).weights
            except Exception as e:  # reported to the request that asked for this key
                out[key] = e
        return out

    return fetch_many


def _fleet(name: str, cfg: ServeConfig, metrics: Any) -> Any:
    """The engine actors of one base on Ray (lorafleet/fleet/); the base here only gives its
    tokenizer and facts to the services: its weights stay in the engines' processes."""
    from lorafleet.fleet import RayOptions, WorkerConfig, build_fleet
    from lorafleet.model import load_base

    base = cfg.engines[name][0] if name in cfg.engines else load_base(name, cfg.paths, dtype=cfg.dtype, weights=False)
    worker = WorkerConfig(
        base=name, home=str(cfg.paths.home), database_url=cfg.paths.database_url if cfg.use_catalog else None,
        store_url=cfg.paths.store_url, dtype=cfg.dtype, device=cfg.device, cpu_prepack=cfg.cpu_prepack,
        threads=cfg.engine_threads,
        gap_timeout_s=cfg.gap_timeout_s, max_sample_queue=cfg.max_sample_queue,
        micro_batch_tokens=cfg.micro_batch_tokens, max_slots=cfg.max_slots,
        max_host_adapters=cfg.max_host_adapters, max_host_bytes=cfg.max_host_bytes, load_queue=cfg.load_queue,
        load_batch=cfg.load_batch, max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens, kv_cache_bytes=cfg.kv_cache_bytes)
    opts = RayOptions(engines=max(1, cfg.ray_engines), threads=cfg.engine_threads, address=cfg.ray_address)
    return build_fleet(base, worker, opts, metrics, max_sample_queue=cfg.max_sample_queue)


def _load(name: str, cfg: ServeConfig) -> tuple[Any, Any]:
    from lorafleet.engine import Engine
    from lorafleet.model import load_base

    base = load_base(name, cfg.paths, dtype=cfg.dtype, device=cfg.device)
    return base, Engine(base, cpu_prepack=cfg.cpu_prepack)


def create_app(cfg: ServeConfig, service: TinkerService | None = None) -> FastAPI:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from lorafleet.metrics import Metrics

    metrics = Metrics()
    svc = service or build_service(cfg, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.futures.bind_loop(asyncio.get_running_loop())
        for r in svc.runners.values():
            r.start()
        janitor = asyncio.create_task(_janitor(svc, cfg.session_timeout_s))
        app.state.ready = True
        try:
            yield
        finally:
            begin_shutdown(app)
            janitor.cancel()
            for r in svc.runners.values():
                await asyncio.to_thread(r.stop)
                r.residency.close()
            svc.close()
            if catalog is not None:
                catalog.close()

    app = FastAPI(title="lorafleet", lifespan=lifespan)
    app.state.tinker = svc
    app.state.ready = False  # set by the lifespan once the engines run
    catalog = svc.catalog.catalog if svc.catalog is not None else None
    app.state.catalog = catalog
    if cfg.auth == "keys" and catalog is None:
        raise ValueError("--auth keys needs the catalog's API keys (use_catalog)")
    app.state.url_secret = svc.repo.secret("download_url_key")  # the same on every server
    install_errors(app)  # the one map from lorafleet errors to HTTP
    # who is calling and how big its body is, before any route reads the body (api/edge.py)
    app.add_middleware(Edge, mode=cfg.auth, lookup=catalog.principal_for_key if catalog else None,
                       max_body_bytes=cfg.max_body_bytes, max_json_bytes=cfg.max_json_bytes)
    app.middleware("http")(_log_requests)
    app.include_router(tinker_router)
    app.include_router(tinker_ext_router)  # SDK 0.38's session/copy calls, MinT's extensions
    from lorafleet.api.routes.console import mount as mount_console

    mount_console(app)  # the web console at /ui (api/ui/) and its /admin/v1 routes
    from lorafleet.api.routes.engines import router as engines_router

    app.include_router(engines_router)  # GET /admin/v1/engines
    if catalog is not None:
        from lorafleet.api.openai.routes import router as openai_router
        from lorafleet.api.openai.service import OpenAIService
        from lorafleet.api.routes.catalog import router as catalog_router

        app.include_router(catalog_router)
        app.state.openai = OpenAIService(svc.runners, catalog, metrics)
        app.include_router(openai_router)
        from lorafleet.api.openai.dynamic import DynamicLoras
        from lorafleet.api.openai.models import lora_router
        from lorafleet.api.openai.models import router as models_router
        from lorafleet.api.openai.population import router as population_router

        app.state.dynamic_loras = DynamicLoras(app.state.openai, tuple(cfg.lora_roots))
        app.include_router(models_router)
        app.include_router(lora_router)
        app.include_router(population_router)
        # hosted Tinker serves its OpenAI-compatible API at <base>/oai/api/v1: the same routes
        app.include_router(openai_router, prefix=OAI_PREFIX)
        app.include_router(models_router, prefix=OAI_PREFIX)

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> Response:
        engines = {name: r.health(cfg.stall_s) for name, r in sorted(svc.runners.items())}
        ok = all(h["ok"] for h in engines.values())
        return _json(200 if ok else 503, {"status": "ok" if ok else "unhealthy", "bases": sorted(svc.runners),
                                          "engines": engines})

    @app.get("/readyz")
    async def readyz() -> Response:
        ready = app.state.ready and all(r.health(cfg.stall_s)["ok"] for r in svc.runners.values())
        return _json(200 if ready else 503, {"status": "ready" if ready else "not ready"})

    app.add_api_route("/health", healthz, methods=["GET"], include_in_schema=False)  # common alias
    return app


def begin_shutdown(app: FastAPI) -> None:
    """Shutdown has begun: not ready any more, and every engine drains its serving jobs, so open
    streams end now with an error event (uvicorn waits for open responses before it runs the
    lifespan shutdown). Idempotent; `lorafleet serve` calls it as soon as a signal arrives."""
    if not app.state.ready:
        return
    app.state.ready = False
    log.info("shutting down: admitting no new work and ending open streams (bounded wait %d s); "
             "Tinker work still queued reports an error after the next start", GRACEFUL_SHUTDOWN_S)
    for r in app.state.tinker.runners.values():
        r.drain()


def _json(status: int, body: dict) -> Response:
    from fastapi.responses import JSONResponse

    return JSONResponse(body, status_code=status)


async def _janitor(svc: TinkerService, session_timeout_s: float, every_s: float = 30.0) -> None:
    """Retention: expire delivered futures, fail those of dead servers, drop checkpoints past
    their TTL, end silent sessions."""
    while True:
        await asyncio.sleep(every_s)
        try:
            svc.futures.expire()
            svc.futures.recover()  # futures of servers that died (on a shared database)
            svc.checkpoints.gc_expired()
            svc.expire_sessions(session_timeout_s)
        except Exception:
            log.exception("janitor failed")


async def _log_requests(request: Request, call_next):
    t0 = time.perf_counter()
    response = await call_next(request)
    level = logging.DEBUG if request.url.path.startswith(_QUIET) else logging.INFO
    log.log(level, "%s %s -> %d in %.1f ms", request.method, request.url.path,
            response.status_code, (time.perf_counter() - t0) * 1000)
    return response
