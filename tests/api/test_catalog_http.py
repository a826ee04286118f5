"""The /catalog/v1 HTTP API on a small app (router + error map), SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lorafleet.api import errors
from lorafleet.api.edge import Edge
from lorafleet.api.routes.catalog import router
from lorafleet.catalog import Catalog, Principal
from lorafleet.errors import NoCapacity
from lorafleet.lora.spec import LoraSpec

BASE = "lorafleet/tiny-llama"
SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))


def _files(weights: bytes) -> dict[str, str]:
    raw = {"adapter_config.json": json.dumps(SPEC.to_peft_config(BASE)).encode(),
           "adapter_model.safetensors": weights}
    return {k: base64.b64encode(v).decode() for k, v in raw.items()}


def _app(catalog: Catalog, auth_mode: str) -> FastAPI:
    app = FastAPI()
    app.state.catalog = catalog
    app.include_router(router)
    errors.install(app)
    app.add_middleware(Edge, mode=auth_mode, lookup=catalog.principal_for_key)
    return app


@pytest.fixture
def clients(catalog):
    """An admin client (auth none) and clients for tenants alice and bob (auth keys)."""
    admin = TestClient(_app(catalog, "none"), base_url="http://127.0.0.1")  # auth none: loopback Host
    keyed = _app(catalog, "keys")
    alice_key = admin.post("/catalog/v1/keys", json={"tenant": "alice"}).json()["key"]
    bob_key = admin.post("/catalog/v1/keys", json={"tenant": "bob"}).json()["key"]
    alice = TestClient(keyed, headers={"X-API-Key": alice_key})
    bob = TestClient(keyed, headers={"Authorization": f"Bearer {bob_key}"})
    return admin, alice, bob, TestClient(keyed)


def _policy(client, name="alice/chat", public=False):
    r = client.post("/catalog/v1/policies", json={
        "name": name, "base_model": BASE, "public": public, "metadata": {"task": "chat"},
        "lora": {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}})
    assert r.status_code == 201, r.text
    return r.json()


def test_full_flow_over_http(clients, catalog):
    _, alice, _, _ = clients
    # a Tinker run's policy (only the Tinker service names runs), so its paths resolve
    catalog.create_policy(Principal("alice"), "alice/chat", BASE, SPEC, metadata={"task": "chat"},
                          tinker_run_id="s:train:0")
    r1 = alice.post("/catalog/v1/policies/alice/chat/revisions",
                    json={"files": _files(b"one"), "step": 1, "aliases": ["prod"]}).json()
    r2 = alice.post("/catalog/v1/policies/alice/chat/revisions", json={
        "files": _files(b"two"), "step": 2, "provenance": {"parent_revision_id": r1["id"], "loss_fn": "ppo"},
        "tinker_path": "tinker://s:train:0/sampler_weights/2"}).json()
    assert r2["seq"] == 2 and r2["provenance"]["loss_fn"] == "ppo"
    get = lambda path, **params: alice.get(f"/catalog/v1{path}", params=params)  # noqa: E731
    assert get("/resolve", ref="alice/chat").json()["id"] == r2["id"]
    assert get("/resolve", ref="alice/chat:prod").json()["id"] == r1["id"]
    assert get("/resolve", ref=f"alice/chat@{r2['sha256'][:8]}").json()["id"] == r2["id"]
    assert get("/resolve", ref="tinker://s:train:0/sampler_weights/2").json()["id"] == r2["id"]
    assert get("/files", ref="alice/chat:prod", name="adapter_model.safetensors").content == b"one"
    assert set(get("/manifest", ref=r1["id"]).json()["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert get("/policies", meta="task=chat").json()["items"][0]["name"] == "alice/chat"
    assert [r["seq"] for r in get("/policies/alice/chat/revisions").json()["items"]] == [2, 1]

    gated = alice.put("/catalog/v1/policies/alice/chat/aliases/prod", json={"ref": r2["id"], "require": "acc>=0.5"})
    assert gated.status_code == 422 and "no evaluation" in gated.json()["detail"]
    assert alice.post("/catalog/v1/evaluations", json={"ref": r2["id"], "suite": "s", "metrics": {"acc": 0.7}}).status_code == 201
    moved = alice.put("/catalog/v1/policies/alice/chat/aliases/prod", json={"ref": r2["id"], "require": "acc>=0.5"})
    assert moved.status_code == 200 and moved.json()["from_revision_id"] == r1["id"]
    back = alice.post("/catalog/v1/policies/alice/chat/aliases/prod/rollback", json={})
    assert back.json()["to_revision_id"] == r1["id"]
    hist = get("/policies/alice/chat/aliases/prod/history").json()
    assert [h["action"] for h in hist] == ["set", "set", "rollback"]
    assert get("/compare", a=r1["id"], b=r2["id"]).json()["rows"][0]["b"] == 0.7
    assert [r["id"] for r in get("/lineage", ref=r2["id"]).json()["ancestors"]] == [r1["id"]]
    assert get("/evaluations", ref=r2["id"]).json()[0]["metrics"] == {"acc": 0.7}
    assert alice.delete("/catalog/v1/revisions", params={"ref": r1["id"]}).status_code == 422  # aliased
    assert alice.delete("/catalog/v1/policies/alice/chat").status_code == 204
    assert get("/resolve", ref="alice/chat").status_code == 404


def test_tenancy_is_404_never_403(clients):
    admin, alice, bob, anonymous = clients
    _policy(alice, "alice/secret")
    _policy(alice, "alice/open", public=True)
    rev = alice.post("/catalog/v1/policies/alice/secret/revisions", json={"files": _files(b"s"), "aliases": ["prod"]}).json()
    alice.post("/catalog/v1/policies/alice/open/revisions", json={"files": _files(b"o")})
    missing = bob.get("/catalog/v1/resolve", params={"ref": "alice/nonexistent"})
    for ref in ("alice/secret", "alice/secret:prod", rev["id"]):
        hidden = bob.get("/catalog/v1/resolve", params={"ref": ref})
        assert hidden.status_code == 404 == missing.status_code
    assert bob.get("/catalog/v1/policies/alice/secret").status_code == 404
    assert bob.get("/catalog/v1/policies/alice/secret/aliases/prod/history").status_code == 404
    assert bob.get("/catalog/v1/resolve", params={"ref": "alice/open"}).status_code == 200
    assert bob.post("/catalog/v1/policies/alice/open/revisions", json={"files": _files(b"x")}).status_code == 404
    assert [p["name"] for p in bob.get("/catalog/v1/policies").json()["items"]] == ["alice/open"]
    assert anonymous.get("/catalog/v1/policies").status_code == 401
    assert TestClient(anonymous.app, headers={"X-API-Key": "tml-wrong"}).get("/catalog/v1/policies").status_code == 401
    assert bob.post("/catalog/v1/keys", json={"tenant": "bob"}).status_code == 401  # admin only
    assert admin.get("/catalog/v1/resolve", params={"ref": "alice/secret:prod"}).status_code == 200
    assert bob.put("/catalog/v1/policies/alice/secret/visibility", json={"public": True}).status_code == 404
    assert alice.put("/catalog/v1/policies/alice/secret/visibility", json={"public": True}).json()["public"]
    assert bob.get("/catalog/v1/resolve", params={"ref": "alice/secret:prod"}).status_code == 200


def test_bad_input_is_4xx_with_a_message(clients):
    _, alice, _, _ = clients
    _policy(alice)
    cases = [
        alice.get("/catalog/v1/resolve", params={"ref": "alice/chat:BAD"}),
        alice.get("/catalog/v1/resolve", params={"ref": "not a ref"}),
        alice.get("/catalog/v1/resolve"),  # missing parameter
        alice.post("/catalog/v1/policies", json={"name": "x"}),
        alice.post("/catalog/v1/policies", json={"name": "alice/y", "base_model": BASE, "lora": {"rank": 0, "target_modules": ["q_proj"]}}),
        alice.post("/catalog/v1/policies", json={"name": "alice/y", "base_model": BASE, "lora": {"rank": 4, "target_modules": ["nope"]}}),
        alice.post("/catalog/v1/policies/alice/chat/revisions", json={"files": {"adapter_config.json": "!!"}}),
        alice.post("/catalog/v1/policies/alice/chat/revisions", json={"files": _files(b"w"), "kind": "bogus"}),
        alice.put("/catalog/v1/policies/alice/chat/aliases/Bad", json={"ref": "alice/chat"}),
        alice.get("/catalog/v1/policies", params={"limit": 0}),
        alice.post("/catalog/v1/evaluations", json={"ref": "alice/chat", "suite": "s", "metrics": {"a": "x"}}),
    ]
    for r in cases:
        assert r.status_code == 400, (r.request.url, r.text)
        assert r.json()["detail"]
    wrong_rank = {**_files(b"w"), "adapter_config.json": base64.b64encode(
        json.dumps(LoraSpec(8, target_modules=("q_proj", "v_proj")).to_peft_config(BASE)).encode()).decode()}
    r = alice.post("/catalog/v1/policies/alice/chat/revisions", json={"files": wrong_rank})
    assert r.status_code == 400 and "does not match policy" in r.json()["detail"]
    dup = alice.post("/catalog/v1/policies", json={"name": "alice/chat", "base_model": BASE,
                                                   "lora": {"rank": 4, "target_modules": ["q_proj"]}})
    assert dup.status_code == 422
    assert alice.get("/catalog/v1/resolve", params={"ref": "alice/chat"}).status_code == 404  # no revision


def test_error_map_and_openapi(catalog):
    app = _app(catalog, "none")

    @app.get("/busy")
    def busy() -> None:
        raise NoCapacity("all slots busy", retry_after_s=2.5)

    client = TestClient(app, base_url="http://127.0.0.1")
    r = client.get("/busy")
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    paths = client.get("/openapi.json").json()["paths"]
    assert "/catalog/v1/resolve" in paths and "/catalog/v1/policies/{owner}/{name}/aliases/{alias}/rollback" in paths


def test_audit_log_is_tenant_scoped(clients):
    admin, alice, bob, _ = clients
    _policy(alice)
    r1 = alice.post("/catalog/v1/policies/alice/chat/revisions", json={"files": _files(b"1")}).json()
    r2 = alice.post("/catalog/v1/policies/alice/chat/revisions", json={"files": _files(b"2")}).json()
    alice.put("/catalog/v1/policies/alice/chat/aliases/prod", json={"ref": r1["id"]}).raise_for_status()
    alice.put("/catalog/v1/policies/alice/chat/aliases/prod", json={"ref": r2["id"]}).raise_for_status()
    alice.post("/catalog/v1/policies/alice/chat/aliases/prod/rollback", json={"reason": "regressed"}
               ).raise_for_status()
    mine = alice.get("/catalog/v1/audit").json()["items"]
    assert [(e["action"], e["from_value"], e["to_value"]) for e in mine[:3]] == [
        ("alias.rollback", r2["id"], r1["id"]), ("alias.set", r1["id"], r2["id"]), ("alias.set", None, r1["id"])]
    assert mine[0]["actor"] == "alice" and mine[0]["reason"] == "regressed" and mine[-1]["action"] == "key.create"
    assert {e["tenant"] for e in bob.get("/catalog/v1/audit").json()["items"]} == {"bob"}
    assert bob.get("/catalog/v1/audit", params={"tenant": "alice"}).status_code == 404
    every = admin.get("/catalog/v1/audit", params={"limit": 1000}).json()["items"]
    assert {e["tenant"] for e in every} == {"alice", "bob"}
    assert admin.get("/catalog/v1/audit", params={"cursor": str(1 << 70)}).status_code == 400
