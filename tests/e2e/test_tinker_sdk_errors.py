"""Bad input through the SDK gets a clear 4xx at once (no minutes of client retries)."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import TINY
from tests.e2e.test_tinker_sdk_basic import datum

PROMPT_S = 10.0  # the SDK retries 408/409/429/5xx for 5 minutes; a 4xx must come back at once


def raises_fast(exc, fn):
    t0 = time.monotonic()
    with pytest.raises(exc) as info:
        fn()
    assert time.monotonic() - t0 < PROMPT_S
    return info.value


@pytest.fixture(scope="module")
def tc(server):
    client = tinker.ServiceClient(base_url=server.url)
    return client.create_lora_training_client(base_model=TINY, rank=4).result()


def test_unknown_base_model(service_client):
    err = raises_fast(tinker.NotFoundError, lambda: service_client.create_lora_training_client(
        base_model="nobody/nothing", rank=4).result())
    assert "nobody/nothing" in str(err)


def test_unknown_run_and_checkpoint(server):
    rest = tinker.RestClient(base_url=server.url)
    raises_fast(tinker.NotFoundError, lambda: rest.get_training_run("s-none:train:0").result())
    raises_fast(tinker.NotFoundError, lambda: tinker.ServiceClient(base_url=server.url)
                .create_training_client_from_state("tinker://s-none:train:0/weights/x").result())


def _mk(tokens, **inputs):
    return types.Datum(model_input=types.ModelInput.from_ints(tokens),
                       loss_fn_inputs={k: np.asarray(v) for k, v in inputs.items()})


@pytest.mark.parametrize("data, loss, match", [
    ([_mk([1, 2, 3], target_tokens=np.arange(2), weights=np.ones(3, np.float32))],
     "cross_entropy", "leading dimension"),
    ([_mk([1, 2, 3], target_tokens=np.ones(3, np.float32))], "cross_entropy", "int64"),
    ([_mk([1, 2, 3], target_tokens=np.arange(3), logprobs=np.zeros(3, np.float32))],
     "importance_sampling", "advantages"),
    ([_mk([1, 2, 10**6], target_tokens=np.arange(3), weights=np.ones(3, np.float32))],
     "cross_entropy", "vocabulary"),
    ([_mk([1, 2, 3], target_tokens=np.array([1, 2, 10**6]), weights=np.ones(3, np.float32))],
     "cross_entropy", "vocabulary"),
])
def test_bad_training_input_is_400(tc, data, loss, match):
    err = raises_fast(tinker.BadRequestError, lambda: tc.forward_backward(data, loss).result())
    assert match in str(err)


def test_unknown_loss_is_400(server, tc):
    body = _fwdbwd_body(tc.model_id, seq_id=10_000, loss_fn="nope")
    r = httpx.post(f"{server.url}/api/v1/forward_backward", content=body,
                   headers={"Content-Type": "application/x-protobuf", "X-API-Key": "tml-x"})
    assert r.status_code == 400 and "unknown loss_fn" in r.text


def test_bad_sampling_input(server, service_client):
    sc = service_client.create_sampling_client(base_model=TINY)
    bad = types.ModelInput.from_ints([1, 10**6])
    raises_fast(tinker.BadRequestError, lambda: sc.sample(
        bad, num_samples=1, sampling_params=types.SamplingParams(max_tokens=2)).result())


def _fwdbwd_body(model_id: str, seq_id: int, loss_fn: str = "cross_entropy",
                 tokens: tuple[int, ...] = (1, 2, 3, 4)) -> bytes:
    from tinker.proto import request_conv

    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=[datum(list(tokens))], loss_fn=loss_fn, loss_fn_config=None),
        model_id=model_id, seq_id=seq_id)
    return request_conv.forward_backward_request_to_proto(req).SerializeToString()


def test_malformed_bodies_are_400(server, tc):
    h = {"X-API-Key": "tml-x"}
    r = httpx.post(f"{server.url}/api/v1/forward_backward", content=b"\x0a\xff\xff",
                   headers={**h, "Content-Type": "application/x-protobuf"})
    assert r.status_code == 400 and "protobuf" in r.text
    r = httpx.post(f"{server.url}/api/v1/create_session", content=b"{not json",
                   headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.text
    r = httpx.post(f"{server.url}/api/v1/optim_step", json={"model_id": tc.model_id, "seq_id": "x"},
                   headers=h)
    assert r.status_code == 400
    r = httpx.get(f"{server.url}/api/v1/training_runs?limit=abc", headers=h)
    assert r.status_code == 400


def test_idempotent_retry_and_422_on_different_content(server, tc):
    h = {"X-API-Key": "tml-x", "Content-Type": "application/x-protobuf"}
    url = f"{server.url}/api/v1/forward_backward"
    seq = 20_000  # far ahead: stays queued behind the gap, which is fine for this check
    a = httpx.post(url, content=_fwdbwd_body(tc.model_id, seq), headers=h)
    b = httpx.post(url, content=_fwdbwd_body(tc.model_id, seq), headers=h)
    assert a.status_code == b.status_code == 200
    assert a.json()["request_id"] == b.json()["request_id"]
    c = httpx.post(url, content=_fwdbwd_body(tc.model_id, seq, tokens=(5, 6, 7)), headers=h)
    assert c.status_code == 422 and "different request" in c.text


def test_unknown_future_is_404_and_try_again_after_hold(server, tc):
    h = {"X-API-Key": "tml-x"}
    r = httpx.post(f"{server.url}/api/v1/retrieve_future", json={"request_id": "req-nope"}, headers=h)
    assert r.status_code == 404
    pend = httpx.post(f"{server.url}/api/v1/forward_backward",
                      content=_fwdbwd_body(tc.model_id, 30_000),
                      headers={**h, "Content-Type": "application/x-protobuf"}).json()
    server.service.futures.hold_s = 0.2
    try:
        r = httpx.post(f"{server.url}/api/v1/retrieve_future",
                       json={"request_id": pend["request_id"]}, headers=h)
    finally:
        server.service.futures.hold_s = 5.0
    assert r.json()["type"] == "try_again"
