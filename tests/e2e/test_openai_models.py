"""`/v1/models` and vLLM's dynamic LoRA routes on a real server (tiny-llama):

- listing: with `--auth none` an adapter imported by `lorafleet adapters import --name alice/x`
  is listed (it was served but not listed); with keys a tenant sees its own and published
  adapters only; OpenAI-style cursor pages (`limit`, `after` -> `has_more`, `last_id`) walk
  the whole list exactly once;
- `POST /v1/load_lora_adapter` / `unload_lora_adapter` called with raw httpx as vLLM clients
  do, then the loaded name used through the openai SDK; paths outside `--lora-root`, links
  out of it, relative paths and missing folders are refused with 4xx, and nothing is published.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import openai
import pytest

from lorafleet.catalog.records import ADMIN
from lorafleet.lora.io import write_peft_dir
from lorafleet.lora.spec import LoraSpec
from tests.conftest import TEST_HOME
from tests.e2e.conftest import TINY, start_server
from tests.helpers import random_adapter

SPEC = LoraSpec(rank=2, alpha=16.0, target_modules=("q_proj", "v_proj"))
PROMPT = "Once upon a time"


def peft_dir(info, path, seed: int):
    write_peft_dir(random_adapter(info, SPEC, seed=seed, b_scale=1.0), TINY, path)
    return path


@pytest.fixture(scope="module")
def local(paths, tiny_pair, tmp_path_factory):
    state = tmp_path_factory.mktemp("models-local")
    root = tmp_path_factory.mktemp("lora-root")
    live = start_server(paths, [TINY], state, engines={TINY: tiny_pair}, lora_roots=(root,))
    live.state, live.root, live.info = state, root, tiny_pair[0].info
    live.http = httpx.Client(base_url=live.url, timeout=120)
    yield live
    live.http.close()
    live.stop()


@pytest.fixture(scope="module")
def keyed(paths, tiny_pair, tmp_path_factory):
    live = start_server(paths, [TINY], tmp_path_factory.mktemp("models-keyed"), engines={TINY: tiny_pair},
                        auth="keys")
    catalog = live.app.state.catalog
    live.keys = {"alice": catalog.create_key("alice"), "bob": catalog.create_key("bob")}
    info = tiny_pair[0].info
    for name, public in (("alice/private", False), ("alice/shared", True), ("bob/own", False)):
        catalog.create_policy(ADMIN, name, TINY, SPEC, public=public)
        catalog.publish_weights(ADMIN, name, random_adapter(info, SPEC, seed=1))
    yield live
    live.stop()


def sdk(live, key: str = "tml-local") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0, timeout=120)


def greedy(c: openai.OpenAI, model: str) -> str:
    return c.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text


def test_auth_none_lists_an_adapter_imported_for_another_owner(local, tmp_path):
    folder = peft_dir(local.info, tmp_path / "x", seed=5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")} | {
        "LORAFLEET_HOME": str(TEST_HOME), "OMP_NUM_THREADS": "1",
        "LORAFLEET_DATABASE_URL": f"sqlite:///{local.state / 'catalog.db'}",
        "LORAFLEET_STORE_URL": str(local.state / "store")}
    out = subprocess.run([sys.executable, "-m", "lorafleet", "adapters", "import", str(folder), "--name", "alice/x",
                          "--base", TINY], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    c = sdk(local)
    ids = [m.id for m in c.models.list().data]
    assert ids[0] == TINY and "alice/x" in ids  # served and now listed
    assert greedy(c, "alice/x") != greedy(c, TINY)


def test_keyed_listing_is_own_and_published(keyed):
    alice = {m.id for m in sdk(keyed, keyed.keys["alice"]).models.list().data}
    bob = {m.id for m in sdk(keyed, keyed.keys["bob"]).models.list().data}
    assert {TINY, "alice/private", "alice/shared"} <= alice and "bob/own" not in alice
    assert {TINY, "alice/shared", "bob/own"} <= bob and "alice/private" not in bob
    # a cursor naming another tenant's private adapter is refused like a missing one
    r = httpx.get(f"{keyed.url}/v1/models", params={"after": "alice/private"},
                  headers={"Authorization": f"Bearer {keyed.keys['bob']}"})
    assert r.status_code == 400 and "after" in r.json()["error"]["message"]


def test_pages_walk_the_whole_list_once(local):
    catalog = local.app.state.catalog
    for i in range(7):
        catalog.create_policy(ADMIN, f"pager/p{i}", TINY, SPEC)
    full = local.http.get("/v1/models").json()
    assert full["object"] == "list" and full["has_more"] is False
    assert full["first_id"] == TINY and full["last_id"] == full["data"][-1]["id"]
    ids, after = [], None
    while True:
        page = local.http.get("/v1/models", params={"limit": 3} | ({"after": after} if after else {})).json()
        assert len(page["data"]) <= 3
        ids += [m["id"] for m in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert ids == [m["id"] for m in full["data"]] and len(ids) == len(set(ids)) >= 8
    for bad in ({"limit": 0}, {"limit": 1001}, {"after": "nobody/nothing"}, {"after": "not a name"}):
        r = local.http.get("/v1/models", params=bad)
        assert r.status_code == 400, (bad, r.text)


def test_load_and_unload_like_vllm(local):
    folder = peft_dir(local.info, local.root / "sql-lora", seed=7)
    r = local.http.post("/v1/load_lora_adapter", json={"lora_name": "sql-lora", "lora_path": str(folder)})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'sql-lora' added successfully."
    svc = local.app.state.openai
    rev = svc.resolve("sql-lora", ADMIN).revision_id
    assert svc._where(svc.resolve("sql-lora", ADMIN)) == {
        "ref": "sql-lora", "revision_id": rev, "base": TINY, "tier": "slot", "pinned": True}
    # the openai SDK uses the loaded name, as with vLLM; it is the caller's own policy
    c = sdk(local)
    tuned = greedy(c, "sql-lora")
    assert tuned == greedy(c, "local/sql-lora") and tuned != greedy(c, TINY)
    assert "sql-lora" in [m.id for m in c.models.list().data]
    assert c.models.retrieve("sql-lora").root == TINY
    again = local.http.post("/v1/load_lora_adapter", json={"lora_name": "sql-lora", "lora_path": str(folder)})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    # load_inplace: a new revision of the same policy replaces the pinned one
    peft_dir(local.info, folder, seed=8)
    r = local.http.post("/v1/load_lora_adapter",
                        json={"lora_name": "sql-lora", "lora_path": str(folder), "load_inplace": True})
    assert r.status_code == 200, r.text
    rev2 = svc.resolve("sql-lora", ADMIN).revision_id
    residency = svc.runners[TINY].residency
    assert rev2 != rev and residency.is_pinned(rev2) and not residency.is_pinned(rev)
    assert greedy(c, "sql-lora") != tuned
    # unload: unpinned and evicted, the revisions stay in the catalog (and still serve)
    r = local.http.post("/v1/unload_lora_adapter", json={"lora_name": "sql-lora"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'sql-lora' removed successfully."
    assert not residency.is_pinned(rev2) and str(residency.tier(rev2)) == "store"
    catalog = local.app.state.catalog
    assert len(catalog.list_revisions(ADMIN, "local/sql-lora").items) == 2
    r = local.http.post("/v1/unload_lora_adapter", json={"lora_name": "sql-lora"})
    assert r.status_code == 404 and "cannot be found" in r.json()["error"]["message"]


def test_paths_outside_the_roots_are_refused(local, tmp_path):
    outside = peft_dir(local.info, tmp_path / "outside", seed=9)
    linked = local.root / "linked"
    linked.symlink_to(outside, target_is_directory=True)
    half = local.root / "half"
    half.mkdir()
    (half / "adapter_config.json").write_text((outside / "adapter_config.json").read_text())
    (half / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    broken = local.root / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    cases = [
        ({"lora_name": "a1", "lora_path": str(outside)}, 403, "outside"),
        ({"lora_name": "a2", "lora_path": f"{local.root}/../{outside.parent.name}/outside"}, 403, "outside"),
        ({"lora_name": "a3", "lora_path": str(linked)}, 403, "outside"),
        ({"lora_name": "a4", "lora_path": str(half)}, 403, "links outside"),
        ({"lora_name": "a5", "lora_path": "sql-lora"}, 400, "absolute"),
        ({"lora_name": "a6", "lora_path": str(local.root / "missing")}, 404, "No adapter found"),
        ({"lora_name": "a7", "lora_path": str(broken)}, 400, ""),
        ({"lora_name": "a8"}, 400, "Both 'lora_name' and 'lora_path'"),
        ({"lora_name": "bob/x", "lora_path": str(outside)}, 403, "outside"),  # admin may write bob/
        ({"lora_name": "bad name!", "lora_path": str(local.root)}, 400, "invalid policy name"),
    ]
    for body, status, says in cases:
        r = local.http.post("/v1/load_lora_adapter", json=body)
        assert r.status_code == status, (body, r.text)
        assert says in r.json()["error"]["message"], (body, r.text)
    names = {p.full_name for p in local.app.state.catalog.list_policies(ADMIN, limit=1000).items}
    assert not names & {f"local/a{i}" for i in range(1, 9)}  # nothing was published


def test_keyed_server_without_roots_and_other_owners(keyed):
    bob = httpx.Client(base_url=keyed.url, headers={"X-API-Key": keyed.keys["bob"]}, timeout=60)
    r = bob.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"})
    assert r.status_code == 403 and "--lora-root" in r.json()["error"]["message"]
    # another owner's name: the same 400 whether it exists or not (no existence oracle)
    answers = [bob.post("/v1/load_lora_adapter", json={"lora_name": n, "lora_path": "/tmp"})
               for n in ("alice/private", "alice/no-such")]
    assert [a.status_code for a in answers] == [400, 400]
    assert answers[0].json() == answers[1].json() and "cannot load adapters as 'alice'" in answers[0].text
    assert bob.post("/v1/unload_lora_adapter", json={"lora_name": "alice/private"}).status_code == 404
    bob.close()
