"""The web console: static assets at /ui and the two JSON routes the existing APIs lack.

The console (api/ui/, a single page of plain HTML, CSS and JS, no build step, no CDN) runs in
the browser and calls the same JSON APIs as the SDKs and the CLI, with the API key the user
typed, so a tenant sees exactly what its key may see. Its assets are public (auth.PUBLIC):
they hold no data. The routes here fill two gaps:

- GET /admin/v1/serving: per engine, its residency (slots, host cache, cold-load queue) and
  the server's cumulative request, time-to-first-token and token counters with a timestamp;
  the page derives rates (req/s, tokens/s, mean TTFT) from the difference of two polls. These
  are fleet-wide counts, as on /metrics; no adapter or tenant is named.
- GET /admin/v1/runs/{model_id}: a Tinker run's per-step metrics (api/tinker/run_metrics.py)
  and the catalog policy its checkpoints are published into, under the caller's tenancy.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.staticfiles import StaticFiles

from lorafleet.api.auth import get_tenant
from lorafleet.errors import NotFound

UI_DIR = Path(__file__).resolve().parents[1] / "ui"

router = APIRouter(prefix="/admin/v1", tags=["console"])


def mount(app: FastAPI) -> None:
    """Serve the console at /ui and its JSON routes under /admin/v1."""
    app.include_router(router)
    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")


# Counter and histogram samples summed over their labels, by the key the page reads.
_COUNTERS = {
    "requests": "lorafleet_request_seconds_count",
    "request_seconds": "lorafleet_request_seconds_sum",
    "first_tokens": "lorafleet_time_to_first_token_seconds_count",
    "first_token_seconds": "lorafleet_time_to_first_token_seconds_sum",
    "cold_loads": "lorafleet_cold_loads_total",
    "cold_load_rejections": "lorafleet_cold_load_rejections_total",
}


@router.get("/serving")
def serving(request: Request) -> dict[str, Any]:
    get_tenant(request)  # a data route: under --auth keys it takes a key like the others
    runners = request.app.state.tinker.runners
    engines = []
    registry = None
    for name, runner in sorted(runners.items()):
        res = runner.residency
        registry = registry or res.metrics.registry
        counts = res.counts()
        engines.append({"base": name, "slots": counts["slot"], "max_slots": res.max_slots,
                        "pinned_slots": res.max_slots - res.free_slots_for_batch(),
                        "host": counts["host"], "load_queue": res.loader.depth})
    counters = dict.fromkeys(_COUNTERS, 0.0)
    tokens: dict[str, float] = {}
    wanted = {v: k for k, v in _COUNTERS.items()}
    for metric in registry.collect() if registry is not None else ():
        for s in metric.samples:
            if s.name in wanted:
                counters[wanted[s.name]] += s.value
            elif s.name == "lorafleet_tokens_total":
                tokens[s.labels.get("kind", "")] = s.value
    return {"at": time.time(), "engines": engines, "counters": counters, "tokens": tokens}


@router.get("/runs/{model_id}")
def run(model_id: str, request: Request) -> dict[str, Any]:
    who = get_tenant(request)
    svc = request.app.state.tinker
    svc.run_row(who.tenant, model_id)  # NotFound for another tenant's run
    policy = None
    catalog = getattr(request.app.state, "catalog", None)
    if catalog is not None:
        try:
            policy = catalog.policy_for_run(who, model_id).full_name
        except NotFound:  # nothing published yet
            policy = None
    return {"model_id": model_id, "policy": policy, "series": svc.run_metrics.series(model_id)}
