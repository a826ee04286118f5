"""Per-tenant quotas on a live server (--auth keys): over a hard cap is 403, over the queue
quota 429 with Retry-After; every message names the limit, its value and the current usage.
Tenant values (`lorafleet keys create --max-...`) win over the server defaults."""

from __future__ import annotations

import httpx
import pytest

from lorafleet.cli import main
from tests.e2e.conftest import TINY, start_server

FWD = {"data": [{"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
                 "loss_fn_inputs": {"target_tokens": {"data": [2, 3, 4], "dtype": "int64", "shape": [3]}}}],
       "loss_fn": "cross_entropy"}
LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def limited(paths, tiny_pair, tmp_path_factory):
    live = start_server(paths, [TINY], tmp_path_factory.mktemp("quota"), engines={TINY: tiny_pair},
                        auth="keys", hold_s=0.5, gap_timeout_s=60.0, max_runs=1, max_queued=2,
                        max_adapters=1)
    yield live
    live.stop()


def _client(live, tenant: str, **quotas) -> httpx.Client:
    catalog = live.app.state.catalog
    catalog.create_tenant(tenant)
    if quotas:
        catalog.set_quotas(tenant, **quotas)
    return httpx.Client(base_url=live.url, headers={"X-API-Key": catalog.create_key(tenant)}, timeout=60)


def _run(http: httpx.Client, seq: int = 0) -> httpx.Response:
    session = http.post("/api/v1/create_session", json={}).json()["session_id"]
    return http.post("/api/v1/create_model", json={"session_id": session, "base_model": TINY,
                                                   "model_seq_id": seq, "lora_config": {"rank": 4}})


def _wait(http, fut) -> dict:
    while True:
        r = http.post("/api/v1/retrieve_future", json={"request_id": fut["request_id"]}).json()
        if r.get("type") != "try_again":
            return r


def test_max_runs_is_a_hard_cap(limited):
    http = _client(limited, "runner")
    first = _run(http)
    assert first.status_code == 200
    model_id = _wait(http, first.json())["model_id"]
    second = _run(http)
    assert second.status_code == 403, second.text
    msg = second.json()["detail"]
    assert "max_runs=1" in msg and "1 training runs" in msg
    # a finished session frees its run's place
    session = model_id.split(":")[0]
    assert http.post(f"/api/v1/sessions/{session}/finish", json={}).status_code == 200
    assert _run(http).status_code == 200


def test_max_queued_is_429_with_retry_after(limited):
    http = _client(limited, "queuer", max_runs=5)
    model_id = _wait(http, _run(http).json())["model_id"]
    # seq 2 and 3 wait behind the missing seq 1, so they stay queued
    for seq in (2, 3):
        r = http.post("/api/v1/forward_backward", json={"model_id": model_id, "seq_id": seq,
                                                        "forward_backward_input": FWD})
        assert r.status_code == 200, r.text
    over = http.post("/api/v1/forward_backward", json={"model_id": model_id, "seq_id": 4,
                                                       "forward_backward_input": FWD})
    assert over.status_code == 429, over.text
    assert int(over.headers["Retry-After"]) >= 1
    assert "max_queued=2" in over.json()["detail"] and "2 requests are queued" in over.json()["detail"]
    # the gap filled, the queue drains and the same request is accepted
    fill = http.post("/api/v1/forward_backward", json={"model_id": model_id, "seq_id": 1,
                                                       "forward_backward_input": FWD})
    assert fill.status_code == 429  # still full: filling the gap is queued work too
    limited.app.state.catalog.set_quotas("queuer", max_queued=3)
    fill = http.post("/api/v1/forward_backward", json={"model_id": model_id, "seq_id": 1,
                                                       "forward_backward_input": FWD})
    assert fill.status_code == 200
    _wait(http, fill.json())


def test_max_adapters_and_tenant_values_win(limited):
    http = _client(limited, "owner")
    ok = http.post("/catalog/v1/policies", json={"name": "owner/a", "base_model": TINY, "lora": LORA})
    assert ok.status_code == 201
    over = http.post("/catalog/v1/policies", json={"name": "owner/b", "base_model": TINY, "lora": LORA})
    assert over.status_code == 403
    assert "max_adapters=1" in over.json()["detail"] and "owns 1 adapters" in over.json()["detail"]
    roomy = _client(limited, "roomy", max_adapters=3)
    for name in ("a", "b", "c"):
        assert roomy.post("/catalog/v1/policies", json={"name": f"roomy/{name}", "base_model": TINY,
                                                        "lora": LORA}).status_code == 201
    assert roomy.post("/catalog/v1/policies", json={"name": "roomy/d", "base_model": TINY,
                                                    "lora": LORA}).status_code == 403


def test_keys_create_sets_quotas(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LORAFLEET_DATABASE_URL", raising=False)
    monkeypatch.delenv("LORAFLEET_STORE_URL", raising=False)
    assert main(["keys", "create", "--tenant", "t", "--max-runs", "2", "--max-queued", "8",
                 "--max-adapters", "3"]) == 0
    assert main(["keys", "create", "--tenant", "u", "--max-runs", "-1"]) == 2
    capsys.readouterr()
    from lorafleet.catalog import Catalog
    from lorafleet.catalog.records import Quotas
    from lorafleet.config import paths_from_env

    paths = paths_from_env()
    cat = Catalog.open(paths.database_url, paths.store_url)
    try:
        assert cat.quotas_for("t") == Quotas(2, 8, 3)
        assert cat.list_keys("u") == []  # a refused quota made no key
    finally:
        cat.close()
