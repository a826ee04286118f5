"""Input validation and error reporting at the edge (issue 10), on a real server on loopback.

Bad values (NaN/inf numbers, out-of-range hyper-parameters, NUL characters) are a 400 from the
route and create no future; a run that diverges fails its future with a clear user error in
strict JSON; a server-side fault shows clients only "internal error <id>; see server log".
"""

from __future__ import annotations

import json
import logging
import math
import urllib.parse

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tests.catalog.backends import BACKENDS, database_url
from tests.e2e.conftest import TINY, start_server
from tests.e2e.test_tinker_sdk_basic import BATCH
from tests.e2e.test_tinker_sdk_errors import raises_fast

H = {"X-API-Key": "tml-x"}
NAN, INF = float("nan"), float("inf")


def strict_json(text: str):
    def refuse(c):
        raise AssertionError(f"invalid JSON constant {c} in {text[:200]}")
    return json.loads(text, parse_constant=refuse)


def n_futures(server) -> int:
    from sqlalchemy import func, select

    from lorafleet.catalog.tinker_tables import tinker_futures

    with server.service.repo.db.read() as conn:
        return conn.execute(select(func.count()).select_from(tinker_futures)).scalar_one()


def refused(server, fn, match: str = ""):
    """`fn` fails at once with a 400 naming the problem, and no future was created."""
    before = n_futures(server)
    err = raises_fast(tinker.BadRequestError, fn)
    assert match in str(err)
    assert n_futures(server) == before
    return err


@pytest.fixture()
def tc(service_client):
    return service_client.create_lora_training_client(base_model=TINY, rank=4).result()


def _ppo_datum() -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={
        "target_tokens": np.array([2, 3, 4]), "logprobs": np.zeros(3, np.float32),
        "advantages": np.ones(3, np.float32)})


def test_non_finite_loss_fn_config_is_400(server, tc):
    for bad in (NAN, INF, -INF):
        refused(server, lambda bad=bad: tc.forward_backward(
            [_ppo_datum()], "ppo", loss_fn_config={"clip_low_threshold": bad}).result(), "finite")
    # the JSON form of SDKs <= 0.24, NaN as a bare JSON constant and as a string
    for raw in (b"NaN", b"1e400", b'"nan"'):
        body = (b'{"model_id": "%s", "seq_id": 50000, "forward_backward_input": {"loss_fn": "ppo",'
                b' "loss_fn_config": {"clip_low_threshold": %s}, "data": []}}'
                % (tc.model_id.encode(), raw))
        r = httpx.post(f"{server.url}/api/v1/forward_backward", content=body,
                       headers={**H, "Content-Type": "application/json"})
        assert r.status_code == 400 and "finite" in r.text, r.text


def test_bad_adam_params_are_400(server, tc):
    for bad in (dict(learning_rate=NAN), dict(learning_rate=INF), dict(learning_rate=-1.0),
                dict(beta1=NAN), dict(beta1=1.0), dict(beta2=-0.1), dict(eps=NAN),
                dict(weight_decay=INF), dict(grad_clip_norm=NAN), dict(learning_rate=1e39)):
        refused(server, lambda bad=bad: tc.optim_step(types.AdamParams(**bad)).result(),
                next(iter(bad)))


def test_bad_sampling_params_are_400(server, service_client):
    vocab = server.service.runner(TINY).base.info.vocab_size
    sc = service_client.create_sampling_client(base_model=TINY)
    prompt = types.ModelInput.from_ints([1, 2])
    for bad, match in ((dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                       (dict(top_k=-2), "top_k"), (dict(stop=[vocab]), "vocabulary"),
                       (dict(stop=[1, -1]), "vocabulary")):
        refused(server, lambda bad=bad: sc.sample(prompt, 1, types.SamplingParams(
            max_tokens=2, **bad)).result(), match)
    # the SDK will not send NaN; a raw client can, as a JSON constant or a string
    for field, raw in (("temperature", b"NaN"), ("temperature", b"1e400"), ("top_p", b"NaN"),
                       ("temperature", b'"nan"'), ("top_p", b'"-Infinity"')):
        before = n_futures(server)
        r = httpx.post(f"{server.url}/api/v1/asample", headers={**H, "Content-Type": "application/json"},
                       content=b'{"base_model": "%s", "prompt": {"chunks": [{"tokens": [1, 2]}]}, '
                       b'"sampling_params": {"max_tokens": 2, "%s": %s}}' % (TINY.encode(), field.encode(), raw))
        assert r.status_code == 400 and "finite" in r.text, r.text
        assert n_futures(server) == before
    # the boundary values still sample
    assert sc.sample(prompt, 1, types.SamplingParams(max_tokens=2, temperature=0.0, top_k=0,
                                                     stop=[vocab - 1])).result().sequences


def test_ttl_out_of_range_is_400(server, tc):
    refused(server, lambda: tc.save_state("ttl-huge", ttl_seconds=10**18).result(), "ttl_seconds")
    refused(server, lambda: tc.save_state("ttl-neg", ttl_seconds=-5).result(), "ttl_seconds")
    for raw in (b"1e400", b"1e18", b"-1"):
        before = n_futures(server)
        r = httpx.post(f"{server.url}/api/v1/save_weights", headers={**H, "Content-Type": "application/json"},
                       content=b'{"model_id": "%s", "path": "t", "seq_id": 60000, "ttl_seconds": %s}'
                       % (tc.model_id.encode(), raw))
        assert r.status_code == 400 and "ttl_seconds" in r.text, r.text
        assert n_futures(server) == before
        r = httpx.put(f"{server.url}/api/v1/training_runs/{tc.model_id}/checkpoints/weights/t/ttl",
                      content=b'{"ttl_seconds": %s}' % raw, headers={**H, "Content-Type": "application/json"})
        assert r.status_code == 400 and "ttl_seconds" in r.text, r.text


def test_nul_in_tinker_strings_is_400(server, service_client, tc):
    refused(server, lambda: service_client.create_lora_training_client(
        base_model=TINY, rank=4, user_metadata={"k": "a\x00b"}).result(), "NUL")
    refused(server, lambda: tc.save_state("ok", user_metadata={"k\x00": "v"}).result(), "NUL")
    r = httpx.post(f"{server.url}/api/v1/create_session", headers=H,
                   json={"tags": ["a\x00"], "user_metadata": {"x": [1, {"y": "\x00"}]}})
    assert r.status_code == 400 and "NUL" in r.text, r.text
    r = httpx.get(f"{server.url}/api/v1/training_runs/{urllib.parse.quote(tc.model_id + chr(0))}",
                  headers=H)
    assert r.status_code == 400 and "NUL" in r.text, r.text
    r = httpx.get(f"{server.url}/api/v1/sessions?limit=5&x=%00", headers=H)
    assert r.status_code == 400 and "NUL" in r.text, r.text


def test_divergence_is_a_clear_user_error_in_strict_json(server, tc):
    tc.forward_backward(BATCH, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e30)).result()  # finite, absurd: weights blow up
    with pytest.raises(tinker.TinkerError) as info:
        tc.forward_backward(BATCH, "cross_entropy").result()
    assert "NaN or infinity" in str(info.value)
    with pytest.raises(tinker.TinkerError) as info:  # its gradients never reach the weights
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    assert "refused" in str(info.value)
    from sqlalchemy import select

    from lorafleet.catalog.tinker_tables import tinker_futures as f

    with server.service.repo.db.read() as conn:
        rows = [dict(r._mapping) for r in conn.execute(
            select(f.c.request_id, f.c.category).where(f.c.scope == tc.model_id, f.c.state == "failed")
            .order_by(f.c.seq_id))]
    assert [r["category"] for r in rows] == ["user", "user"]
    for accept in ("application/json", "application/x-protobuf"):  # JSON-era and proto clients
        r = httpx.post(f"{server.url}/api/v1/retrieve_future", json={"request_id": rows[0]["request_id"]},
                       headers={**H, "Accept": accept})
        assert r.status_code == 200
        assert strict_json(r.text)["category"] == "user"


def test_non_finite_json_result_fails_its_future(server):
    futures = server.service.futures
    rid, _ = futures.submit("local", "optim_step", "fp")
    futures.complete_json(rid, {"metrics": {"grad_norm": math.inf}, "type": "optim_step"})
    r = httpx.post(f"{server.url}/api/v1/retrieve_future", json={"request_id": rid}, headers=H)
    assert r.status_code == 200
    body = strict_json(r.text)
    assert body["category"] == "user" and "NaN or infinity" in body["error"]


def test_server_fault_text_stays_in_the_server_log(server, tc, caplog):
    store = server.service.checkpoints.store
    root = store.root
    tc.forward_backward(BATCH, "cross_entropy").result()
    saved = tc.save_state("fine").result().path
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()  # new weights: new blobs to write
    # a file where the store's temp folder should be: an OSError deep in the engine's I/O worker
    (root / "tmp").rename(root / "tmp-aside")
    (root / "tmp").write_bytes(b"")
    caplog.set_level(logging.ERROR)
    try:
        with pytest.raises(tinker.TinkerError) as info:
            tc.save_weights_for_sampler("blocked").result()
    finally:
        (root / "tmp").unlink()
        (root / "tmp-aside").rename(root / "tmp")
    message = str(info.value)
    assert "internal error" in message and "see server log" in message
    assert str(root) not in message and "Errno" not in message
    error_id = message.split("internal error ")[1].split(";")[0]
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)
    # an unexpected exception in a route (a blob gone from the store): a 500 naming only the error id
    name = saved.rsplit("/", 1)[1]
    urls = httpx.get(f"{server.url}/api/v1/training_runs/{tc.model_id}/checkpoints/weights/{name}"
                     "/external_weights_urls", headers=H).json()["urls"]
    row = server.service.checkpoints.find("local", saved)
    ref = server.service.repo.checkpoint_files(row["tinker_path"])["adapter_model.safetensors"]
    blob = store.path(ref.sha256)
    kept = blob.read_bytes()
    blob.unlink()
    try:
        r = httpx.get(urls["adapter_model.safetensors"])
    finally:
        store.put(kept)  # the same bytes may back other checkpoints of this module
    assert r.status_code == 500
    assert "internal error" in r.json()["detail"] and str(root) not in r.text


@pytest.fixture(params=BACKENDS)
def catalog_server(request, paths, tiny_pair, tmp_path):
    with database_url(request.param, tmp_path) as url:
        live = start_server(paths, [TINY], tmp_path / "state", engines={TINY: tiny_pair},
                            database_url=url, hold_s=5.0, gap_timeout_s=5.0)
        yield live
        live.stop()


def test_nul_and_non_finite_values_are_400_on_every_catalog_backend(catalog_server):
    url = f"{catalog_server.url}/catalog/v1"
    policy = {"name": "local/p", "base_model": TINY, "metadata": {"task": "chat"},
              "lora": {"rank": 4, "target_modules": ["q_proj"]}}
    for bad in ({"name": "local/p\x00"}, {"metadata": {"task": "a\x00"}},
                {"metadata": {"t\x00": "a"}}, {"tinker_run_id": "\x00"}):
        r = httpx.post(f"{url}/policies", json=policy | bad, headers=H)
        assert r.status_code == 400 and "NUL" in r.text, (bad, r.text)
    assert httpx.post(f"{url}/policies", json=policy, headers=H).status_code == 201
    for query in ("meta=task%3Dchat%00", "q=p%00", "cursor=%00"):
        r = httpx.get(f"{url}/policies?{query}", headers=H)
        assert r.status_code == 400 and "NUL" in r.text, (query, r.text)
    for path in ("policies/local/p%00", "policies/local/p/aliases/a%00/history"):
        r = httpx.get(f"{url}/{path}", headers=H)
        assert r.status_code == 400 and "NUL" in r.text, (path, r.text)
    r = httpx.get(f"{url}/resolve", params={"ref": "local/p\x00:latest"}, headers=H)
    assert r.status_code == 400 and "NUL" in r.text
    for metric in (b"1e400", b"NaN", b"-Infinity"):
        r = httpx.post(f"{url}/evaluations", headers={**H, "Content-Type": "application/json"},
                       content=b'{"ref": "local/p", "suite": "s", "metrics": {"acc": %s}}' % metric)
        assert r.status_code == 400, r.text
    for grace in ("inf", "nan"):
        assert httpx.post(f"{url}/gc?grace_s={grace}", headers=H).status_code == 400
    # the OpenAI API and the Tinker API on the same database
    r = httpx.post(f"{catalog_server.url}/v1/completions", headers=H,
                   json={"model": "local/p\x00", "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 400 and "NUL" in r.text, r.text
    r = httpx.post(f"{catalog_server.url}/v1/completions", headers=H,
                   content=b'{"model": "%s", "prompt": "hi", "max_tokens": 1, "temperature": NaN}'
                   % TINY.encode())
    assert r.status_code == 400, r.text
    client = tinker.ServiceClient(base_url=catalog_server.url)
    refused(catalog_server, lambda: client.create_lora_training_client(
        base_model=TINY, rank=4, user_metadata={"k": "\x00"}).result(), "NUL")
