"""MinT's extensions on loopback (tiny-llama), through real httpx (the tinker SDK has no calls
for them) and the real tinker SDK for everything around them: interpolate, train_step,
checkpoint upload then resume."""

from __future__ import annotations

import io
import json
import tarfile

import httpx
import numpy as np
import pytest
import tinker
import torch
from tinker import types

from lorafleet.catalog.records import ADMIN
from lorafleet.lora import io as lora_io
from tests.e2e.conftest import TINY
from tests.helpers import tinker_rows
from tests.e2e.test_tinker_sdk_basic import BATCH, datum

H = {"X-API-Key": "tml-x"}
ADAM = types.AdamParams(learning_rate=1e-2, eps=1e-8)
PROMPT = [1, 5, 9, 13, 17, 21, 3]


def post(server, path, headers=None, **kw):
    return httpx.post(f"{server.url}/api/v1/{path}", headers={**H, **(headers or {})}, timeout=120, **kw)


def result(server, answer):
    assert answer.status_code == 200, answer.text
    while True:
        r = post(server, "retrieve_future", json={"request_id": answer.json()["request_id"]}).json()
        if r.get("type") != "try_again":
            return r


def sampler_logprobs(sc, path):
    return sc.create_sampling_client(model_path=path).result().compute_logprobs(
        types.ModelInput.from_ints(PROMPT)).result()[1:]


@pytest.fixture(scope="module")
def sources(server):
    """Two rank-4 runs trained on different data, a sampler checkpoint of each, and a rank-2 one."""
    sc = tinker.ServiceClient(base_url=server.url)
    out = []
    for batch in (BATCH, [datum([3, 8, 2, 7, 1, 9, 4])]):
        tc = sc.create_lora_training_client(base_model=TINY, rank=4).result()
        for _ in range(2):
            tc.forward_backward(batch, "cross_entropy").result()
            tc.optim_step(ADAM).result()
        out.append((tc, tc.save_weights_for_sampler("src").result().path))
    other = sc.create_lora_training_client(base_model=TINY, rank=2).result()
    return sc, out, other.save_weights_for_sampler("rank2").result().path


def _weights(server, path):
    svc = server.service
    return lora_io.parse_peft_files(svc.checkpoints.read_files(svc.repo.checkpoint(path))).weights


def _delta(w, path):
    a, b = w.pairs[path]
    return w.spec.scale * (b.double() @ a.double())


def _add(model, module, delta):
    """W += delta on one module, as PEFT applies a LoRA: on that module alone (a new
    Parameter, so the LM head of a tied-embedding base changes without its embedding)."""
    sub = model.get_submodule(module)
    sub.weight = torch.nn.Parameter(sub.weight.detach() + delta.to(sub.weight.dtype), requires_grad=False)


def test_interpolate_one_zero_is_the_first_source(server, sources):
    sc, [(tc_a, pa), (_, pb)], _ = sources
    r = post(server, "mint/checkpoints/interpolate", json={"source_paths": [pa, pb], "coefficients": [1, 0],
                                                            "output_path": "one-zero"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["path"].endswith("/sampler_weights/one-zero") and tc_a.model_id not in body["path"]
    assert body["rank"] == 8 and body["has_rank_shards"] and body["max_frobenius_error"] == 0
    np.testing.assert_allclose(sampler_logprobs(sc, body["path"]), sampler_logprobs(sc, pa), atol=1e-5)
    # provenance: the catalog revision names its sources and coefficients
    rev = server.app.state.catalog.resolve(body["path"], ADMIN)
    assert rev.provenance.loss_fn == "interpolate"
    assert rev.provenance.loss_config["sources"] == [pa, pb]
    assert rev.provenance.loss_config["coefficients"] == [1, 0]
    assert rev.provenance.parent_revision_id == server.app.state.catalog.resolve(pa, ADMIN).id


def test_interpolate_half_half_is_the_averaged_delta(server, sources, paths):
    """Against a torch reference: the base's weights plus 0.5 * delta_a + 0.5 * delta_b."""
    from lorafleet.model import load_base

    sc, [(_, pa), (_, pb)], _ = sources
    r = post(server, "mint/checkpoints/interpolate", json={"source_paths": [pa, pb], "coefficients": [0.5, 0.5]})
    assert r.status_code == 200, r.text
    wa, wb = _weights(server, pa), _weights(server, pb)
    model = load_base(TINY, paths).model
    with torch.no_grad():
        for module in wa.pairs:
            _add(model, module, 0.5 * _delta(wa, module) + 0.5 * _delta(wb, module))
        logits = model(torch.tensor([PROMPT[:-1]])).logits[0].float()
    want = torch.log_softmax(logits, -1)[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])]
    np.testing.assert_allclose(sampler_logprobs(sc, r.json()["path"]), want.numpy(), atol=1e-4)


def test_interpolate_svd_rank_reduction_meets_its_bound(server, sources):
    _, [(_, pa), (_, pb)], _ = sources
    r = post(server, "mint/checkpoints/interpolate", json={
        "source_paths": [pa, pb], "coefficients": [0.7, 0.3], "target_rank": 2})
    assert r.status_code == 200, r.text
    assert r.json()["rank"] == 2 and not r.json()["has_rank_shards"]
    wa, wb, got = _weights(server, pa), _weights(server, pb), _weights(server, r.json()["path"])
    assert got.spec.rank == 2
    worst = 0.0
    for module in wa.pairs:
        exact = 0.7 * _delta(wa, module) + 0.3 * _delta(wb, module)
        bound = torch.linalg.svdvals(exact)[2:].pow(2).sum().sqrt().item()  # Eckart-Young
        err = (exact - _delta(got, module)).norm().item()
        assert err == pytest.approx(bound, rel=1e-3, abs=1e-6)
        worst = max(worst, bound)
    assert r.json()["max_frobenius_error"] == pytest.approx(worst, rel=1e-3)


def test_interpolate_refusals_write_nothing(server, sources):
    _, [(_, pa), (_, pb)], p_rank2 = sources
    before = len(tinker_rows(server.service, "checkpoints"))
    cases = {
        "one coefficient per source": {"source_paths": [pa, pb], "coefficients": [1.0]},
        "non-zero": {"source_paths": [pa, pb], "coefficients": [0, 0]},
        "rank": {"source_paths": [pa, p_rank2], "coefficients": [0.5, 0.5]},
        "twice": {"source_paths": [pa, pa], "coefficients": [0.5, 0.5]},
        "within": {"source_paths": [pa, pb], "coefficients": [1e300, 1]},
        "target_rank": {"source_paths": [pa, pb], "coefficients": [1, 1], "target_rank": 0},
    }
    for needle, body in cases.items():
        r = post(server, "mint/checkpoints/interpolate", json=body)
        assert r.status_code == 400 and needle in r.text, (needle, r.status_code, r.text)
    r = post(server, "mint/checkpoints/interpolate", content=b'{"source_paths": ["%s"], "coefficients": [NaN]}'
             % pa.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = post(server, "mint/checkpoints/interpolate", json={"source_paths": ["tinker://x:train:0/sampler_weights/n"],
                                                            "coefficients": [1]})
    assert r.status_code == 404
    assert len(tinker_rows(server.service, "checkpoints")) == before


def _run(server, seed):
    session = post(server, "create_session", json={}).json()["session_id"]
    return result(server, post(server, "create_model", json={
        "session_id": session, "base_model": TINY, "lora_config": {"rank": 4, "seed": seed}}))["model_id"]


FWD = {"loss_fn": "cross_entropy", "data": [{
    "model_input": {"chunks": [{"type": "encoded_text", "tokens": PROMPT[:-1]}]},
    "loss_fn_inputs": {"target_tokens": {"data": PROMPT[1:], "dtype": "int64", "shape": [6]},
                       "weights": {"data": [1.0] * 6, "dtype": "float32", "shape": [6]}}}]}
ADAM_JSON = {"learning_rate": 1e-2, "eps": 1e-8}


def test_train_step_equals_forward_backward_then_optim_step(server):
    a, b = _run(server, 7), _run(server, 7)
    fb = result(server, post(server, "forward_backward", json={"model_id": a, "seq_id": 1, "forward_backward_input": FWD}))
    step = result(server, post(server, "optim_step", json={"model_id": a, "seq_id": 2, "adam_params": ADAM_JSON}))
    fused = result(server, post(server, "train_step", json={"model_id": b, "seq_id": 1, "forward_backward_input": FWD,
                                                             "adam_params": ADAM_JSON}))
    assert fused["type"] == "train_step", fused
    assert fused["output"]["metrics"]["loss:sum"] == pytest.approx(fb["metrics"]["loss:sum"], rel=1e-6)
    assert fused["output"]["loss_fn_outputs"][0]["logprobs"]["data"] == pytest.approx(
        fb["loss_fn_outputs"][0]["logprobs"]["data"], abs=1e-6)
    assert fused["metrics"] == pytest.approx(step["metrics"], rel=1e-6)
    # the step was applied before the next call of the run: the same weights after
    after_a = result(server, post(server, "forward", json={"model_id": a, "seq_id": 3, "forward_input": FWD}))
    after_b = result(server, post(server, "forward", json={"model_id": b, "seq_id": 2, "forward_input": FWD}))
    assert after_b["metrics"]["loss:sum"] == pytest.approx(after_a["metrics"]["loss:sum"], rel=1e-6)
    assert after_b["metrics"]["loss:sum"] < fb["metrics"]["loss:sum"]
    # refusals before any work: an unknown run, a bad learning rate, a used seq_id
    assert post(server, "train_step", json={"model_id": "nobody:train:0", "seq_id": 1,
                                            "forward_backward_input": FWD}).status_code == 404
    r = post(server, "train_step", json={"model_id": b, "seq_id": 3, "forward_backward_input": FWD,
                                         "adam_params": {"learning_rate": -1}})
    assert r.status_code == 400, r.text
    r = post(server, "train_step", json={"model_id": b, "seq_id": 1, "forward_backward_input": FWD,
                                         "adam_params": {"learning_rate": 0.5}})
    assert r.status_code in (400, 409, 422), r.text


def _archive(files: dict[str, bytes], folder: str = "ckpt", links: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}" if folder else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if links:
            link = tarfile.TarInfo(f"{folder}/evil")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
    return buf.getvalue()


def _dirs(n: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i in range(n):
            d = tarfile.TarInfo(f"d{i}")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
    return buf.getvalue()


def test_upload_then_resume_gives_the_same_next_loss(server):
    sc = tinker.ServiceClient(base_url=server.url)
    tc = sc.create_lora_training_client(base_model=TINY, rank=4).result()
    tc.forward_backward(BATCH, "cross_entropy").result()
    tc.optim_step(ADAM).result()
    state = tc.save_state("to-upload").result().path
    svc = server.service
    files = svc.checkpoints.read_files(svc.repo.checkpoint(state))
    r = httpx.post(f"{server.url}/api/v1/checkpoints/upload", headers=H, timeout=120,
                   files={"file": ("ckpt.tar.gz", _archive(files), "application/gzip")}, data={"name": "up1"})
    assert r.status_code == 200, r.text
    uploaded = r.json()["path"]
    assert uploaded.endswith("/weights/up1") and r.json()["has_optimizer_state"]

    def next_loss(path):
        resumed = sc.create_training_client_from_state_with_optimizer(path).result()
        resumed.forward_backward(BATCH, "cross_entropy").result()
        resumed.optim_step(ADAM).result()
        return resumed.forward(BATCH, "cross_entropy").result().metrics["loss:sum"]

    assert next_loss(uploaded) == pytest.approx(next_loss(state), rel=1e-6)
    info = tinker.RestClient(base_url=server.url).get_weights_info_by_tinker_path(uploaded).result()
    assert info.base_model == TINY and info.lora_rank == 4
    # a raw .tar.gz body (no form) works too, at the top level of the archive
    r = httpx.post(f"{server.url}/api/v1/checkpoints/upload", headers={**H, "content-type": "application/gzip"},
                   content=_archive(files, folder=""), params={"base_model": TINY}, timeout=120)
    assert r.status_code == 200, r.text


def test_bad_archives_are_refused_and_leave_nothing(server):
    svc = server.service
    tc = tinker.ServiceClient(base_url=server.url).create_lora_training_client(base_model=TINY, rank=4).result()
    files = svc.checkpoints.read_files(svc.repo.checkpoint(tc.save_state("bad-src").result().path))
    counts = lambda: (len(tinker_rows(svc, "checkpoints")),  # noqa: E731
                      len(tinker_rows(svc, "runs")), len(tinker_rows(svc, "sessions")))
    before = counts()
    config = json.loads(files["adapter_config.json"])
    bad = {
        "leads outside": _archive({"../adapter_config.json": files["adapter_config.json"]}, folder=""),
        "absolute": _archive({"/tmp/adapter_config.json": files["adapter_config.json"]}, folder=""),
        "link": _archive(files, links=True),
        "unexpected file": _archive({**files, "run.sh": b"#!/bin/sh"}),
        "lacks": _archive({"adapter_config.json": files["adapter_config.json"]}),
        "not a readable": b"\x1f\x8b" + b"garbage" * 50,
        "more than 16": _dirs(20),
        "not served": _archive({**files, "adapter_config.json": json.dumps(
            {**config, "base_model_name_or_path": "nobody/else"}).encode()}),
        "adapter_model.safetensors": _archive({**files, "adapter_model.safetensors": b"\0" * 64}),
    }
    for needle, data in bad.items():
        r = httpx.post(f"{server.url}/api/v1/checkpoints/upload", headers=H, timeout=60,
                       files={"file": ("x.tar.gz", data, "application/gzip")})
        assert r.status_code in (400, 404) and needle in r.text, (needle, r.status_code, r.text)
    r = httpx.post(f"{server.url}/api/v1/checkpoints/upload", headers=H, timeout=60,
                   files={"other": ("x.tar.gz", _archive(files), "application/gzip")})
    assert r.status_code == 400 and "`file` part" in r.text
    assert counts() == before


def _td(values, dtype="float32"):
    return {"data": list(values), "dtype": dtype, "shape": [len(values)]}


def _tokens(ids):
    return {"chunks": [{"type": "encoded_text", "tokens": list(ids)}]}


def test_reverse_kl_against_a_torch_reference(server, sources, paths):
    """The reference's logprobs (torch, from the merged reference adapter), the KL estimate the
    server reports, and its gradient (a twin run stepped with the same advantages by hand)."""
    from lorafleet.model import load_base

    _, [(_, pa), _], _ = sources
    prompt_s, prompt_r, completion = [1, 5, 9], [2, 4, 6, 8], [13, 17, 21, 3]
    student = prompt_s + completion[:-1]
    target = (prompt_s + completion)[1:]
    weights = [0.0] * (len(prompt_s) - 1) + [1.0] * len(completion)
    ref_input = prompt_r + completion[:-1]
    a, b = _run(server, 11), _run(server, 11)
    fwd = {"loss_fn": "cross_entropy", "data": [{"model_input": _tokens(student), "loss_fn_inputs": {
        "target_tokens": _td(target, "int64"), "weights": _td(weights)}}]}
    old = result(server, post(server, "forward", json={"model_id": a, "seq_id": 1, "forward_input": fwd}))
    old_lp = old["loss_fn_outputs"][0]["logprobs"]["data"]
    datum_kl = {"student_input": _tokens(student), "reference_input": _tokens(ref_input),
                "target_tokens": _td(target, "int64"), "weights": _td(weights), "old_logprobs": _td(old_lp)}
    kl = result(server, post(server, "mint/forward_backward_reverse_kl", json={
        "model_id": a, "seq_id": 2, "reference_model_path": pa, "data": [datum_kl]}))
    assert kl["type"] == "mint_forward_backward_reverse_kl", kl
    # torch reference: the base plus the reference adapter's delta, scored on its own prompt
    ref_w = _weights(server, pa)
    model = load_base(TINY, paths).model
    with torch.no_grad():
        for module in ref_w.pairs:
            _add(model, module, _delta(ref_w, module))
        scored = ref_input + completion[-1:]
        logits = model(torch.tensor([scored[:-1]])).logits[0].float()
    lp = torch.log_softmax(logits, -1)[torch.arange(len(scored) - 1), torch.tensor(scored[1:])]
    ref_lp = [0.0] * (len(prompt_s) - 1) + lp[-len(completion):].tolist()
    want_kl = sum(w * (o - r) for w, o, r in zip(weights, old_lp, ref_lp))
    assert kl["metrics"]["loss:sum"] == pytest.approx(want_kl, abs=1e-4)
    assert kl["outputs"][0]["loss"]["data"][0] == pytest.approx(want_kl, abs=1e-4)
    # the gradient: the twin takes importance_sampling with advantages -w (old - ref) by hand
    result(server, post(server, "forward", json={"model_id": b, "seq_id": 1, "forward_input": fwd}))
    adv = [-w * (o - r) for w, o, r in zip(weights, old_lp, ref_lp)]
    twin = {"loss_fn": "importance_sampling", "data": [{"model_input": _tokens(student), "loss_fn_inputs": {
        "target_tokens": _td(target, "int64"), "logprobs": _td(old_lp), "advantages": _td(adv)}}]}
    result(server, post(server, "forward_backward", json={"model_id": b, "seq_id": 2, "forward_backward_input": twin}))
    for run in (a, b):
        result(server, post(server, "optim_step", json={"model_id": run, "seq_id": 3, "adam_params": ADAM_JSON}))
    after = [result(server, post(server, "forward", json={"model_id": run, "seq_id": 4, "forward_input": fwd}))
             ["loss_fn_outputs"][0]["logprobs"]["data"] for run in (a, b)]
    np.testing.assert_allclose(after[0], after[1], atol=2e-4)
    assert after[0] != pytest.approx(old_lp, abs=1e-4)  # the step moved the student
    # provenance: the next save of the student records the reference model
    saved = result(server, post(server, "save_weights_for_sampler", json={"model_id": a, "seq_id": 5, "path": "kl"}))
    rev = server.app.state.catalog.resolve(saved["path"], ADMIN)
    assert rev.provenance.loss_fn == "reverse_kl"
    assert rev.provenance.loss_config["reference_model_path"] == pa
    # refusals before any work
    base = {"model_id": a, "seq_id": 6, "reference_model_path": pa, "data": [datum_kl]}
    for needle, body in {
        "temperature": {**base, "temperature": 2.0},
        "old_logprobs is required": {**base, "data": [{k: v for k, v in datum_kl.items() if k != "old_logprobs"}]},
        "must end with": {**base, "data": [{**datum_kl, "reference_input": _tokens(prompt_r + [7, 7, 7])}]},
        "shape [6]": {**base, "data": [{**datum_kl, "weights": _td([1.0])}]},
        "neither this run's base": {**base, "reference_model_path": "some/other-model"},
    }.items():
        r = post(server, "mint/forward_backward_reverse_kl", json=body)
        assert r.status_code == 400 and needle in r.text, (needle, r.status_code, r.text)
    r = post(server, "mint/forward_backward_reverse_kl", json={**base, "reference_model_path": "tinker://x:train:0/sampler_weights/n"})
    assert r.status_code == 404
