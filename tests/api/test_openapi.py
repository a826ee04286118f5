"""The OpenAPI schema describes the routes truthfully, so a schema-driven client (and the
fuzzer, tests/e2e/test_fuzz_openapi.py) reaches them: every Tinker route that reads a body
documents it, forward/forward_backward also as protobuf."""

from __future__ import annotations

from fastapi import FastAPI

from lorafleet.api.openai.models import lora_router
from lorafleet.api.openai.models import router as models_router
from lorafleet.api.openai.population import router as population_router
from lorafleet.api.openai.routes import router as openai_router
from lorafleet.api.routes.catalog import router as catalog_router
from lorafleet.api.tinker.routes import router as tinker_router

# POST/PUT routes that take no body at all
BODYLESS = {"/api/v1/client/dynamic_config", "/api/v1/training_runs/{model_id}/checkpoints/{kind}/{name}/publish",
            "/catalog/v1/gc"}


def _spec() -> dict:
    app = FastAPI()
    for r in (tinker_router, openai_router, models_router, lora_router, population_router, catalog_router):
        app.include_router(r)
    return app.openapi()


def test_every_body_is_documented():
    spec = _spec()
    missing = [(m, p) for p, ops in spec["paths"].items() for m, op in ops.items()
               if m in ("post", "put") and p not in BODYLESS and "requestBody" not in op]
    assert not missing, missing
    sample = spec["paths"]["/api/v1/asample"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "sampling_params"} <= set(sample["required"])
    assert "$ref" not in str(sample)  # definitions are inlined: the schema stands alone


def test_protobuf_routes_are_marked():
    spec = _spec()
    for path in ("/api/v1/forward_backward", "/api/v1/forward"):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert set(content) == {"application/json", "application/x-protobuf"}
        assert content["application/x-protobuf"]["schema"]["format"] == "binary"
