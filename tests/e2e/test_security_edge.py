"""The HTTP edge (issue 10): auth before the body, bounded bodies and decoding, loopback-only
`--auth none`, and 400 (never 500) for out-of-range input. Raw httpx/sockets on loopback."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from tinker.proto import tinker_public_pb2 as pb

from lorafleet.api.edge import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_JSON_BYTES
from lorafleet.api.tinker.wire import MAX_REQUEST_VALUES
from tests.e2e.conftest import TINY, start_server

FAST_S = 1.0  # a refusal, or a /healthz answered meanwhile, takes less than this
PROTO = {"content-type": "application/x-protobuf"}


@pytest.fixture(scope="module")
def keyed(paths, tiny_pair, tmp_path_factory):
    live = start_server(paths, [TINY], tmp_path_factory.mktemp("edge-keys"), engines={TINY: tiny_pair},
                        auth="keys", hold_s=2.0)
    live.key = live.app.state.catalog.create_key("edge")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def local(paths, tiny_pair, tmp_path_factory):
    live = start_server(paths, [TINY], tmp_path_factory.mktemp("edge-none"), engines={TINY: tiny_pair},
                        max_body_bytes=4096, hold_s=2.0)
    yield live
    live.stop()


def _bomb() -> bytes:
    """98 bytes that densify to 6e8 float32 values (the issue's 3.3 GB)."""
    msg = pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = b"\x01\x00\x00\x00"
    t = datum.loss_fn_inputs["weights"]
    t.dtype = pb.DTYPE_FLOAT32
    t.shape.extend([3, 200_000_000])
    t.sparse_csr.crow_indices = bytes(4 * 8)
    body = msg.SerializeToString()
    assert len(body) < 128
    return body


def _raw(url: str, head: str, body: bytes = b"") -> tuple[int, bytes, float]:
    """Send `head` (+ `body`) on a socket; (status, response bytes, seconds to the answer)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        t0 = time.perf_counter()
        sock.sendall(head.replace("\n", "\r\n").encode() + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 4 + _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return int(data.split()[1]), data, time.perf_counter() - t0


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def _healthz_while(url: str, work) -> tuple[object, list[float]]:
    """Run `work()` in a thread and probe /healthz until it returns: (its result, probe times)."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", work()))
    thread.start()
    times = []
    with httpx.Client(base_url=url, timeout=30) as c:
        while thread.is_alive() or not times:
            t0 = time.perf_counter()
            assert c.get("/healthz").status_code == 200
            times.append(time.perf_counter() - t0)
    thread.join()
    return out["r"], times


# ---------------------------------------------------------------- H2, M1: auth before the body


def test_sparse_bomb_without_key_is_a_fast_401(keyed):
    t0 = time.perf_counter()
    r = httpx.post(f"{keyed.url}/api/v1/forward_backward", content=_bomb(), headers=PROTO)
    assert r.status_code == 401, r.text
    assert time.perf_counter() - t0 < FAST_S


def test_sparse_bomb_with_key_is_400_naming_the_limit_and_healthz_stays_fast(keyed):
    headers = PROTO | {"X-API-Key": keyed.key}

    def bombs() -> list[httpx.Response]:
        with httpx.Client(timeout=60) as c:
            return [c.post(f"{keyed.url}/api/v1/forward_backward", content=_bomb(), headers=headers)
                    for _ in range(4)]

    responses, probes = _healthz_while(keyed.url, bombs)
    for r in responses:
        assert r.status_code == 400, r.text
        assert f"at most {MAX_REQUEST_VALUES}" in r.json()["detail"]
    assert max(probes) < FAST_S


@pytest.mark.parametrize("path", ["/api/v1/create_session", "/v1/completions", "/catalog/v1/policies"])
def test_no_key_is_401_before_the_body_arrives(keyed, path):
    """Only the headers are sent: the 401 cannot have waited for (or parsed) the body."""
    status, _, took = _raw(keyed.url, f"POST {path} HTTP/1.1\nHost: 127.0.0.1\n"
                                      f"Content-Type: application/json\nContent-Length: {60 << 20}\n\n")
    assert status == 401 and took < FAST_S


@pytest.mark.parametrize(("path", "limit"), [
    ("/api/v1/forward_backward", DEFAULT_MAX_BODY_BYTES), ("/api/v1/create_session", DEFAULT_MAX_JSON_BYTES),
    ("/v1/completions", DEFAULT_MAX_JSON_BYTES), ("/catalog/v1/policies/a/b/revisions", DEFAULT_MAX_BODY_BYTES)])
def test_declared_body_over_the_limit_is_413_before_the_body_arrives(keyed, path, limit):
    """A 200 MB create_session was parsed and stored; now the headers alone are answered."""
    status, data, took = _raw(
        keyed.url, f"POST {path} HTTP/1.1\nHost: 127.0.0.1\nX-API-Key: {keyed.key}\n"
                   f"Content-Type: application/json\nContent-Length: {limit + 1}\n\n")
    assert status == 413 and took < FAST_S
    assert f"limit of {limit} bytes" in data.decode()


def test_chunked_body_over_the_limit_is_413(local):
    def chunks():
        for _ in range(5):
            yield b" " * 1000

    r = httpx.post(f"{local.url}/api/v1/create_session", content=chunks(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]
    small = httpx.post(f"{local.url}/api/v1/create_session", content=iter([b"{}"]))
    assert small.status_code == 200, small.text


def test_stored_session_metadata_is_bounded(keyed):
    r = httpx.post(f"{keyed.url}/api/v1/create_session", headers={"X-API-Key": keyed.key},
                   json={"user_metadata": {"blob": "x" * (1 << 20)}})
    assert r.status_code == 400 and "user_metadata" in r.json()["detail"], r.text


# ---------------------------------------------------------------- one auth module


def test_bearer_and_x_api_key_work_on_every_router(keyed):
    for headers in ({"X-API-Key": keyed.key}, {"Authorization": f"Bearer {keyed.key}"}):
        with httpx.Client(base_url=keyed.url, headers=headers) as c:
            assert c.get("/api/v1/training_runs").status_code == 200
            assert c.post("/api/v1/create_session", json={}).status_code == 200
            assert c.get("/v1/models").status_code == 200
            assert c.get("/catalog/v1/policies").status_code == 200
    assert httpx.get(f"{keyed.url}/api/v1/training_runs",
                     headers={"Authorization": "Bearer tml-wrong"}).status_code == 401
    assert httpx.get(f"{keyed.url}/healthz").status_code == 200


# ---------------------------------------------------------------- M2: /v1 prompts


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_huge_prompt_is_400_and_healthz_stays_fast(keyed, route):
    text = "hello world " * ((10 << 20) // 12)
    body = ({"model": TINY, "prompt": text} if route == "completions"
            else {"model": TINY, "messages": [{"role": "user", "content": text}]})
    path = "/v1/completions" if route == "completions" else "/v1/chat/completions"

    def post() -> httpx.Response:
        return httpx.post(f"{keyed.url}{path}", json=body, headers={"X-API-Key": keyed.key}, timeout=60)

    r, probes = _healthz_while(keyed.url, post)
    assert r.status_code == 400 and "too long" in r.json()["error"]["message"], r.text
    assert max(probes) < FAST_S


# ---------------------------------------------------------------- M5: --auth none is loopback only


def test_auth_none_refuses_foreign_host_and_cross_site_origin(local):
    port = local.url.rsplit(":", 1)[1]
    post = lambda **h: httpx.post(f"{local.url}/api/v1/create_session", content=b"{}",  # noqa: E731
                                  headers={"content-type": "text/plain", **h})
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.nip.io:{port}"):
        r = post(host=host)
        assert r.status_code == 403 and "Host" in r.json()["detail"], host
    for origin in ("http://evil.example", "null", f"http://evil.example:{port}"):
        r = post(origin=origin)
        assert r.status_code == 403 and "Origin" in r.json()["detail"], origin
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "127.0.0.2", f"[::1]:{port}"):
        assert post(host=host).status_code == 200, host
    assert post(origin=f"http://localhost:{port}").status_code == 200
    assert post(origin=f"http://[::1]:{port}").status_code == 200


# ---------------------------------------------------------------- low: 400, never 500


def test_out_of_range_input_is_400(keyed):
    with httpx.Client(base_url=keyed.url, headers={"X-API-Key": keyed.key}) as c:
        deep = b'{"user_metadata": {"a": ' + b"[" * 1000 + b"]" * 1000 + b"}}"
        assert c.post("/api/v1/create_session", content=deep).status_code == 400
        for body in ({"model_id": "m", "seq_id": 1 << 64}, {"model_id": "m", "seq_id": -1}):
            r = c.post("/api/v1/optim_step", json=body)
            assert r.status_code == 400 and "seq_id" in r.json()["detail"], r.text
        for url in ("/api/v1/sessions?limit=-2.7e25", "/api/v1/training_runs?offset=7e35",
                    "/api/v1/checkpoints?offset=9223372036854775808"):
            assert c.get(url).status_code == 400, url
        assert c.get("/api/v1/files/%C3%A4/1/%C3%BC%E2%80%8F/x").status_code == 404
        assert c.get("/api/v1/files/%C3%A4/1/%C3%BC%E2%80%8F/x%00").status_code == 400  # NUL: malformed
        fb = {"model_id": "m", "seq_id": 1, "forward_backward_input": {"loss_fn": "cross_entropy", "data": [
            {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1 << 70]}]},
             "loss_fn_inputs": {}}]}}
        r = c.post("/api/v1/forward_backward", json=fb)
        assert r.status_code == 400 and "tokens" in r.json()["detail"], r.text
        r = c.post("/api/v1/forward_backward", content=json.dumps(fb | {"seq_id": "x"}))
        assert r.status_code == 400, r.text
        r = c.post("/v1/completions", json={"model": TINY, "prompt": [1 << 70]})
        assert r.status_code == 400, r.text
        r = c.post("/v1/chat/completions", json={"model": TINY, "messages": [
            {"role": "user", "content": [{"type": "text", "text": [[["deep"]]]}]}]})
        assert r.status_code == 400, r.text
