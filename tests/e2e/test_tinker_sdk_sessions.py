"""Sessions (heartbeat, finish, expiry), client config, telemetry, sampler back-pressure."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import TINY
from tests.e2e.test_tinker_sdk_basic import BATCH

H = {"X-API-Key": "tml-x"}


def test_client_config_has_explicit_safe_flags(server):
    cfg = httpx.post(f"{server.url}/api/v1/client/config", json={"sdk_version": "0.38.0"},
                     headers=H).json()
    assert cfg["pjwt_auth_enabled"] is False
    assert cfg["sample_use_retrieve_futures"] is False
    assert cfg["sample_join_sampling_session"] is False
    assert cfg["custom_loss_server_side"] is False
    r = httpx.post(f"{server.url}/api/v1/telemetry", json={"events": []}, headers=H)
    assert r.json() == {"status": "accepted"}
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{server.url}/api/v1/healthz").json() == {"status": "ok"}


def test_finish_frees_adapters_and_ends_heartbeats(server):
    runner = server.service.runners[TINY]
    with tinker.ServiceClient(base_url=server.url) as sc:
        tc = sc.create_lora_training_client(base_model=TINY, rank=4).result()
        tc.forward_backward(BATCH, "cross_entropy").result()
        session_id = tc.model_id.split(":")[0]
        assert tc.model_id in runner.runs
    deadline = time.time() + 5
    while tc.model_id in runner.runs and time.time() < deadline:
        time.sleep(0.05)
    assert tc.model_id not in runner.runs
    r = httpx.post(f"{server.url}/api/v1/session_heartbeat",
                   json={"session_id": session_id, "type": "session_heartbeat"}, headers=H)
    assert r.status_code == 410
    r = httpx.post(f"{server.url}/api/v1/get_info", json={"model_id": tc.model_id}, headers=H)
    assert r.status_code == 200  # the run itself is still listed; its adapter is not loaded


def test_silent_sessions_expire(server, service_client):
    tc = service_client.create_lora_training_client(base_model=TINY, rank=4).result()
    runner = server.service.runners[TINY]
    assert server.service.expire_sessions(timeout_s=3600) == 0
    assert server.service.expire_sessions(timeout_s=-1) >= 1
    deadline = time.time() + 5
    while tc.model_id in runner.runs and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(tinker.NotFoundError, match="not loaded"):
        tc.forward_backward(BATCH, "cross_entropy").result()


def test_asample_answers_429_with_retry_after_when_saturated(server, service_client):
    runner = server.service.runners[TINY]
    sc = service_client.create_sampling_client(base_model=TINY)
    saved = runner.max_sample_queue
    runner.max_sample_queue = 0
    try:
        body = {"num_samples": 1, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                "sampling_params": {"max_tokens": 2}, "base_model": TINY}
        r = httpx.post(f"{server.url}/api/v1/asample", json=body, headers=H)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        threading.Timer(1.5, lambda: setattr(runner, "max_sample_queue", saved)).start()
        t0 = time.time()
        out = sc.sample(types.ModelInput.from_ints([1, 2]), 1,
                        types.SamplingParams(max_tokens=2)).result(timeout=60)
        assert out.sequences and time.time() - t0 >= 1.0  # the SDK backed off, then succeeded
    finally:
        runner.max_sample_queue = saved
