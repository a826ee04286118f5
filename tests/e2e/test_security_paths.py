"""Tinker paths under `--auth keys` with two tenants: traversal, claiming, existence oracles.

A real server on loopback; alice trains with the tinker SDK, bob attacks over plain HTTP.
Regressions of issue 10: C1 (a catalog `tinker_path` with `..` deleted the whole Tinker state),
H1 (bob could publish revisions under alice's run and shadow her paths), and the low items
(422 instead of 404 for another tenant's names; names ending in a newline).
"""

from __future__ import annotations

import base64
import json

import httpx
import pytest
import tinker

from lorafleet.lora.spec import LoraSpec
from tests.e2e.conftest import TINY, start_server
from tests.e2e.test_tinker_sdk_basic import BATCH

SPEC = LoraSpec(rank=4, alpha=32.0, target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def keyed(paths, tiny_pair, tmp_path_factory):
    state = tmp_path_factory.mktemp("sec-paths")
    live = start_server(paths, [TINY], state, engines={TINY: tiny_pair}, auth="keys", hold_s=5.0)
    live.state_dir = state
    yield live
    live.stop()


@pytest.fixture(scope="module")
def alice(keyed):
    """Alice's key, a training run of hers and one saved state (`ckpt-1`)."""
    key = keyed.app.state.catalog.create_key("alice")
    tc = tinker.ServiceClient(base_url=keyed.url, api_key=key).create_lora_training_client(
        base_model=TINY, rank=4).result()
    tc.forward_backward(BATCH, "cross_entropy").result()
    state = tc.save_state("ckpt-1").result().path
    return key, tc, state


@pytest.fixture(scope="module")
def bob(keyed):
    key = keyed.app.state.catalog.create_key("bob")
    return httpx.Client(base_url=keyed.url, headers={"X-API-Key": key}, timeout=60)


def intact(keyed) -> bool:
    """The state folder still holds the catalog database and store (the Tinker state's home)."""
    return (keyed.state_dir / "catalog.db").is_file() and (keyed.state_dir / "store" / "blobs").is_dir()


def _files(spec: LoraSpec = SPEC) -> dict[str, str]:
    raw = {"adapter_config.json": json.dumps(spec.to_peft_config(TINY)).encode(),
           "adapter_model.safetensors": b"bob's weights"}
    return {k: base64.b64encode(v).decode() for k, v in raw.items()}


def _bob_policy(bob: httpx.Client, name: str) -> None:
    r = bob.post("/catalog/v1/policies", json={
        "name": f"bob/{name}", "base_model": TINY,
        "lora": {"rank": 4, "alpha": 32.0, "target_modules": ["q_proj", "v_proj"]}})
    assert r.status_code == 201, r.text


def _alice_info(keyed, key: str, path: str) -> httpx.Response:
    return httpx.post(f"{keyed.url}/api/v1/weights_info", json={"tinker_path": path},
                      headers={"X-API-Key": key}, timeout=60)


@pytest.mark.parametrize("bad", [
    "tinker://../weights/..",  # was: 201, then weights_info rmtree'd <state>/ (the old tinker.db included)
    "tinker://../weights/escaped",  # was: written outside the checkpoint root
    "RUN/weights/..",  # another run's folder: was deleted
    "tinker://./weights/x", "tinker://r/weights/.", "tinker://r/weights/x\n",
    "tinker://r/weights/a\x00b", "tinker://r//weights/x", "tinker://r/weights/",
])
def test_bad_tinker_paths_are_400_at_every_edge_and_delete_nothing(keyed, alice, bob, bad):
    key, tc, state = alice
    bad = bad.replace("RUN/", f"tinker://{tc.model_id}/")
    _bob_policy(bob, f"trav-{abs(hash(bad))}")
    pub = bob.post(f"/catalog/v1/policies/bob/trav-{abs(hash(bad))}/revisions",
                   json={"files": _files(), "tinker_path": bad})
    assert pub.status_code == 400, pub.text
    assert bob.get("/catalog/v1/resolve", params={"ref": bad}).status_code == 400
    info = bob.post("/api/v1/weights_info", json={"tinker_path": bad})
    assert info.status_code == 400, info.text
    load = bob.post("/api/v1/load_weights", json={"path": bad, "session_id": "s-x", "model_seq_id": 0})
    assert load.status_code == 400, load.text
    assert intact(keyed)
    assert not (keyed.state_dir / "weights").exists()  # <root>/../weights/escaped
    assert _alice_info(keyed, key, state).status_code == 200  # alice's checkpoint is intact


def test_bob_cannot_claim_alices_tinker_paths(keyed, alice, bob):
    key, tc, state = alice
    _bob_policy(bob, "squat")
    claims = {}
    for path in (f"tinker://{tc.model_id}/weights/ckpt-2",  # not saved yet: was taken by bob
                 state,  # alice's existing path: was 422 "already names a revision" (an oracle)
                 "tinker://s-nobody:train:0/weights/ckpt-2"):  # a run that does not exist
        r = bob.post("/catalog/v1/policies/bob/squat/revisions",
                     json={"files": _files(), "tinker_path": path})
        claims[path] = r
        assert r.status_code == 404, r.text
    # an existing run of another tenant answers exactly like a missing one
    shapes = {r.json()["detail"].replace(p.split("/")[2], "RUN") for p, r in claims.items()}
    assert len(shapes) == 1 and {r.json()["error"] for r in claims.values()} == {"NotFound"}
    # only the Tinker service names runs: bob cannot squat or probe alice's run id
    for run in (tc.model_id, "s-nobody:train:0"):
        r = bob.post("/catalog/v1/policies", json={
            "name": "bob/squat2", "base_model": TINY, "tinker_run_id": run,
            "lora": {"rank": 4, "alpha": 32.0, "target_modules": ["q_proj", "v_proj"]}})
        assert r.status_code == 400, r.text

    path2 = tc.save_state("ckpt-2").result().path  # was: "already names a revision"
    alice_http = httpx.Client(base_url=keyed.url, headers={"X-API-Key": key}, timeout=60)
    rev = alice_http.get("/catalog/v1/resolve", params={"ref": path2}).json()
    assert rev["policy"].startswith("alice/") and rev["tinker_path"] == path2
    assert _alice_info(keyed, key, path2).status_code == 200


def test_another_tenants_checkpoint_names_answer_like_missing_ones(keyed, alice, bob):
    _, tc, _ = alice
    for route in ("save_weights", "save_weights_for_sampler", "save_weights_external"):
        taken = bob.post(f"/api/v1/{route}", json={"model_id": tc.model_id, "path": "ckpt-1", "seq_id": 99})
        missing = bob.post(f"/api/v1/{route}", json={"model_id": "s-nobody:train:0", "path": "ckpt-1",
                                                     "seq_id": 99})
        assert taken.status_code == missing.status_code == 404, (route, taken.text)  # was 422
        assert taken.json()["detail"].replace(tc.model_id, "RUN") == \
            missing.json()["detail"].replace("s-nobody:train:0", "RUN")


def test_names_ending_in_a_newline_are_refused(keyed, alice):
    key, tc, _ = alice
    own = httpx.Client(base_url=keyed.url, headers={"X-API-Key": key}, timeout=60)
    for route in ("save_weights", "save_weights_for_sampler", "save_weights_external"):
        r = own.post(f"/api/v1/{route}", json={"model_id": tc.model_id, "path": "x\n", "seq_id": 1000})
        assert r.status_code == 400 and "checkpoint name" in r.json()["detail"], (route, r.text)
    policy = own.get("/catalog/v1/resolve", params={"ref": tc.save_state("nl").result().path}).json()["policy"]
    r = own.put(f"/catalog/v1/policies/{policy}/aliases/prod%0A", json={"ref": policy})
    assert r.status_code == 400 and "invalid alias" in r.json()["detail"], r.text
    assert own.get(f"/catalog/v1/policies/{policy}/aliases").json() == []


def test_a_stored_revision_with_a_traversal_path_cannot_reach_the_disk(keyed, alice, bob):
    """The repro of C1, with the bad revision already in the catalog (as a server before this
    fix stored it): every Tinker edge refuses the path with 400 and nothing is deleted."""
    from lorafleet.catalog.records import Principal, Provenance, RevisionKind
    from lorafleet.store.manifest import Manifest

    key, _, state = alice
    catalog = keyed.app.state.catalog
    _bob_policy(bob, "legacy")
    policy = catalog.get_policy(Principal("bob"), "bob/legacy")
    files = {k: base64.b64decode(v) for k, v in _files().items()}
    for data in files.values():
        catalog.store.put(data)
    catalog._commit_revision(Principal("bob"), policy, Manifest.for_bytes(files), RevisionKind.SAMPLER,
                             None, Provenance(), None, "tinker://../weights/..", None, (), None)
    for route, body in (("weights_info", {"tinker_path": "tinker://../weights/.."}),
                        ("load_weights", {"path": "tinker://../weights/..", "session_id": "s-x",
                                          "model_seq_id": 0}),
                        ("asample", {"model_path": "tinker://../weights/..", "num_samples": 1,
                                     "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1]}]},
                                     "sampling_params": {"max_tokens": 1}})):
        r = bob.post(f"/api/v1/{route}", json=body)
        assert r.status_code == 400, (route, r.text)  # was 500, with <state>/ emptied
    assert intact(keyed)
    assert _alice_info(keyed, key, state).status_code == 200
