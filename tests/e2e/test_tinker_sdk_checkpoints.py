"""Checkpoints through the SDK: save/load state, sampler saves, REST listing, external weights."""

from __future__ import annotations

import urllib.error
import urllib.request

import numpy as np
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import TINY
from tests.e2e.test_tinker_sdk_basic import BATCH, datum

ADAM = types.AdamParams(learning_rate=1e-2, eps=1e-8)


def test_save_load_state_resumes_exactly(server, service_client):
    tc = service_client.create_lora_training_client(
        base_model=TINY, rank=4, user_metadata={"renderer": "role_colon"}).result()
    tc.forward_backward(BATCH, "cross_entropy").result()
    tc.optim_step(ADAM).result()
    path = tc.save_state("ckpt1").result().path
    assert path == f"tinker://{tc.model_id}/weights/ckpt1"
    tc.forward_backward(BATCH, "cross_entropy").result()
    tc.optim_step(ADAM).result()
    expected = tc.forward(BATCH, "cross_entropy").result().metrics["loss:sum"]

    resumed = service_client.create_training_client_from_state_with_optimizer(path).result()
    assert resumed.model_id.split(":")[-2] == "train"
    resumed.forward_backward(BATCH, "cross_entropy").result()
    resumed.optim_step(ADAM).result()
    got = resumed.forward(BATCH, "cross_entropy").result().metrics["loss:sum"]
    assert got == pytest.approx(expected, rel=1e-5)

    # without the optimizer state: same weights, but fresh Adam moments give another step
    fresh = service_client.create_training_client_from_state(path).result()
    fresh.forward_backward(BATCH, "cross_entropy").result()
    fresh.optim_step(ADAM).result()
    other = fresh.forward(BATCH, "cross_entropy").result().metrics["loss:sum"]
    assert other != pytest.approx(expected, rel=1e-6)

    rest = tinker.RestClient(base_url=server.url)
    run = rest.get_training_run_by_tinker_path(path).result()
    assert run.training_run_id == tc.model_id and run.user_metadata == {"renderer": "role_colon"}
    assert run.last_checkpoint is not None and run.last_checkpoint.tinker_path == path
    info = rest.get_weights_info_by_tinker_path(path).result()
    assert info.base_model == TINY and info.lora_rank == 4


def test_duplicate_checkpoint_name_is_422_not_retried(server, service_client):
    tc = service_client.create_lora_training_client(base_model=TINY, rank=4).result()
    tc.save_state("same").result()
    with pytest.raises(tinker.UnprocessableEntityError):
        tc.save_state("same").result()


def test_sampler_checkpoints_are_immutable_versions(server, service_client):
    tc = service_client.create_lora_training_client(base_model=TINY, rank=4).result()
    tc.forward_backward(BATCH, "cross_entropy").result()
    tc.optim_step(ADAM).result()
    p1 = tc.save_weights_for_sampler("v1").result().path
    assert p1 == f"tinker://{tc.model_id}/sampler_weights/v1"
    s1 = service_client.create_sampling_client(model_path=p1).result()
    prompt = types.ModelInput.from_ints([1, 5, 9, 13, 17])
    lp1 = s1.compute_logprobs(prompt).result()
    for _ in range(3):
        tc.forward_backward(BATCH, "cross_entropy").result()
        tc.optim_step(ADAM).result()
    s2 = tc.save_weights_and_get_sampling_client().result()
    lp2 = s2.compute_logprobs(prompt).result()
    assert lp2[1:] != pytest.approx(lp1[1:], abs=1e-4)  # new weights are live
    assert s1.compute_logprobs(prompt).result()[1:] == pytest.approx(lp1[1:], abs=1e-6)  # old frozen
    rest = tinker.RestClient(base_url=server.url)
    sampler = rest.get_sampler(s1._sampling_session_id).result()
    assert sampler.base_model == TINY


def test_rest_listing_delete_publish_ttl(server, service_client):
    tc = service_client.create_lora_training_client(base_model=TINY, rank=4).result()
    a = tc.save_state("a").result().path
    b = tc.save_weights_for_sampler("b").result().path
    rest = tinker.RestClient(base_url=server.url)
    cps = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert {c.tinker_path for c in cps} == {a, b}
    assert {c.checkpoint_type for c in cps} == {"training", "sampler"}
    runs = rest.list_training_runs().result()
    assert tc.model_id in [r.training_run_id for r in runs.training_runs]
    rest.publish_checkpoint_from_tinker_path(a).result()
    assert any(c.public for c in rest.list_checkpoints(tc.model_id).result().checkpoints)
    rest.unpublish_checkpoint_from_tinker_path(a).result()
    rest.set_checkpoint_ttl_from_tinker_path(a, 3600).result()
    rest.delete_checkpoint_from_tinker_path(b).result()
    cps = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert [c.tinker_path for c in cps] == [a] and cps[0].expires_at is not None
    all_cps = rest.list_user_checkpoints().result().checkpoints
    assert a in [c.tinker_path for c in all_cps]
    sessions = rest.list_sessions().result().sessions
    sess = rest.get_session(sessions[0]).result()
    assert isinstance(sess.training_run_ids, list)
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint_from_tinker_path(b).result()


def test_external_weights_are_standard_peft(server, service_client, tmp_path, paths):
    import torch
    from peft import PeftModel

    from lorafleet.model import load_base

    tc = service_client.create_lora_training_client(base_model=TINY, rank=4).result()
    tc.forward_backward(BATCH, "cross_entropy").result()
    tc.optim_step(ADAM).result()
    path = tc.save_weights_external("export").result().path
    assert path == f"tinker://{tc.model_id}/external_weights/export"
    urls = tinker.RestClient(base_url=server.url).get_external_weights_urls(path).result()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(urls.urls)
    for name, url in urls.urls.items():
        with urllib.request.urlopen(url) as resp:  # no API key: a signed URL
            (tmp_path / name).write_bytes(resp.read())
    peft_model = PeftModel.from_pretrained(load_base(TINY, paths).model, str(tmp_path))
    prompt = [1, 5, 9, 13, 17]
    out = tc.forward([datum(prompt)], "cross_entropy").result()
    want = out.loss_fn_outputs[0]["logprobs"].to_numpy()
    with torch.no_grad():
        logits = peft_model(torch.tensor([prompt[:-1]])).logits[0]
    got = torch.log_softmax(logits.float(), -1)[torch.arange(4), torch.tensor(prompt[1:])].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    bad = urls.urls["adapter_config.json"].replace("/api/v1/files/", "/api/v1/files/x")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad)
    assert e.value.code == 404


def test_runs_and_saves_land_in_the_catalog(server, service_client):
    tc = service_client.create_lora_training_client(base_model=TINY, rank=4).result()
    tc.forward_backward(BATCH, "cross_entropy").result()
    tc.optim_step(ADAM).result()
    state = tc.save_state("s1").result().path
    tc.forward_backward(BATCH, "cross_entropy").result()
    tc.optim_step(ADAM).result()
    sampler = tc.save_weights_for_sampler("w2").result().path
    catalog = server.app.state.catalog
    from lorafleet.catalog.records import ADMIN

    policy = catalog.policy_for_run(ADMIN, tc.model_id)
    assert policy.base_model == TINY and policy.lora.rank == 4
    rev1 = catalog.resolve(state, ADMIN)
    rev2 = catalog.resolve(sampler, ADMIN)
    assert str(rev1.kind) == "state" and rev1.step == 1
    assert str(rev2.kind) == "sampler" and rev2.step == 2
    assert rev2.provenance.parent_revision_id == rev1.id
    assert rev2.provenance.loss_fn == "cross_entropy"
    assert rev2.provenance.optimizer_config["learning_rate"] == pytest.approx(1e-2)
    assert rev2.provenance.data_digest and rev2.provenance.data_digest != rev1.provenance.data_digest
    files = catalog.read_files(ADMIN, sampler)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    import httpx

    r = httpx.get(f"{server.url}/catalog/v1/policies", headers={"X-API-Key": "tml-x"})
    assert r.status_code == 200 and policy.name in r.text
