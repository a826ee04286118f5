"""tinker SDK 0.38's newer calls through the real SDK on loopback: copy_weights (Service and
Rest clients), search_sessions, assign_session_project, export_session_trace; the cookbook's
weights.download() of a weights/ checkpoint (an age-encrypted export, decrypted by the
cookbook); the OpenAI API under hosted Tinker's /oai/api/v1 through the real openai SDK."""

from __future__ import annotations

import urllib.request
import uuid
import warnings

import httpx
import openai
import pytest
import tinker
import torch
from tinker import types

from lorafleet.api.tinker import trace
from lorafleet.lora import io as lora_io
from tests.e2e.conftest import TINY
from tests.helpers import tinker_rows
from tests.e2e.test_tinker_sdk_basic import BATCH

ADAM = types.AdamParams(learning_rate=1e-2, eps=1e-8)
PROMPT = types.ModelInput.from_ints([1, 5, 9, 13, 17])


@pytest.fixture(scope="module")
def trained(server):
    """A run of project proj-src with one step, a training and a sampler checkpoint."""
    sc = tinker.ServiceClient(project_id="proj-src", display_name="nightly sft run",
                              user_metadata={"team": "copy"}, base_url=server.url)
    tc = sc.create_lora_training_client(base_model=TINY, rank=4).result()
    tc.forward_backward(BATCH, "cross_entropy").result()
    tc.optim_step(ADAM).result()
    state = tc.save_state("c1").result().path
    sampler = tc.save_weights_for_sampler("s1").result().path
    return sc, tc, state, sampler


def _search(rest, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # search_sessions is marked experimental by the SDK
        return rest.search_sessions(types.SessionSearchRequest(**kw)).result()


def test_copy_weights_keeps_kind_and_content(server, trained):
    sc, tc, state, sampler = trained
    archive = tinker.ServiceClient(project_id="proj-archive", base_url=server.url)
    copied = archive.copy_weights(state).result()
    assert copied.endswith("/weights/c1") and not copied.startswith(f"tinker://{tc.model_id}/")
    rest = tinker.RestClient(base_url=server.url)
    copied_sampler = rest.copy_weights(sampler, "proj-b", ttl_seconds=7200).result()
    assert copied_sampler.endswith("/sampler_weights/s1")
    # the copies hold the same weights: equal losses, equal logprobs
    a = sc.create_training_client_from_state(state).result().forward(BATCH, "cross_entropy").result()
    b = sc.create_training_client_from_state(copied).result().forward(BATCH, "cross_entropy").result()
    assert b.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=1e-6)
    lp = sc.create_sampling_client(model_path=sampler).result().compute_logprobs(PROMPT).result()
    lp_copy = sc.create_sampling_client(model_path=copied_sampler).result().compute_logprobs(PROMPT).result()
    assert lp_copy[1:] == pytest.approx(lp[1:], abs=1e-6)
    # the copy's run is listed but cannot be trained on
    run_id = copied.split("/")[2]
    assert rest.get_training_run(run_id).result().training_run_id == run_id
    h = {"X-API-Key": "tml-x"}
    r = httpx.post(f"{server.url}/api/v1/optim_step", headers=h, json={"model_id": run_id, "seq_id": 1})
    assert r.status_code == 404 and "not loaded" in r.text
    # the copy expires with its own ttl, not the source's
    ckpts = rest.list_checkpoints(copied_sampler.split("/")[2]).result().checkpoints
    assert [c.expires_at is not None for c in ckpts] == [True]


def test_copy_weights_retry_and_refusals(server, trained):
    _, _, state, _ = trained
    h = {"X-API-Key": "tml-x", "X-Idempotency-Key": str(uuid.uuid4())}
    body = {"source_path": state, "destination_project_id": "proj-r"}
    first = httpx.post(f"{server.url}/api/v1/copy_weights", headers=h, json=body)
    again = httpx.post(f"{server.url}/api/v1/copy_weights", headers=h, json=body)
    assert first.status_code == again.status_code == 200, first.text
    assert first.json() == again.json()  # a retry does not copy twice
    rest = tinker.RestClient(base_url=server.url)
    with pytest.raises(tinker.BadRequestError, match="ttl_seconds"):
        rest.copy_weights(state, "proj-r", ttl_seconds=10).result()
    with pytest.raises(tinker.NotFoundError):
        rest.copy_weights("tinker://nobody:train:0/weights/x", "proj-r").result()
    with pytest.raises(tinker.BadRequestError, match="weights_access_token"):
        rest.copy_weights(state, "proj-r", weights_access_token="tok").result()


def test_search_sessions_and_assign_project(server, trained):
    sc, tc, _, _ = trained
    session_id = tc.model_id.split(":")[0]
    rest = tinker.RestClient(base_url=server.url)
    page = _search(rest, display_name="SFT nightly")  # every word, any case, any order
    assert [x.session_id for x in page.sessions] == [session_id]
    hit = page.sessions[0]
    assert hit.project_id == "proj-src" and hit.owner == "local" and hit.checkpoints_count == 2
    assert hit.user_metadata == {"team": "copy"} and hit.status.type == "active"
    assert _search(rest, session_id=session_id, user_metadata={"team": "other"}).sessions == []
    assert _search(rest, project_ids=["proj-src"], statuses=[types.ActiveSessionStatusQuery()]).sessions
    rest.assign_session_project(session_id, "proj-moved").result()
    assert _search(rest, project_ids=["proj-src"]).sessions == []
    assert [x.session_id for x in _search(rest, project_ids=["proj-moved"]).sessions] == [session_id]
    with pytest.raises(tinker.NotFoundError):
        rest.assign_session_project("s-nope", "p").result()
    # pages: newest first, the cursor continues exactly where the last page ended
    for _ in range(3):
        tinker.ServiceClient(project_id="proj-pages", base_url=server.url) \
            .create_lora_training_client(base_model=TINY, rank=2).result()
    seen, req = [], {"project_ids": ["proj-pages"], "limit": 2}
    while True:
        page = _search(rest, **req)
        seen += [x.session_id for x in page.sessions]
        if page.next_cursor is None:
            break
        req["cursor"] = page.next_cursor
    assert len(seen) == len(set(seen)) == 3


def test_export_session_trace(server, trained):
    _, tc, _, _ = trained
    session_id = tc.model_id.split(":")[0]
    url = tinker.RestClient(base_url=server.url).export_session_trace(session_id).result()
    data = urllib.request.urlopen(url).read()  # a signed URL: no key
    msg = trace.messages()["Trace"]()
    msg.ParseFromString(data)
    tracks = {p.track_descriptor.uuid: p.track_descriptor.name for p in msg.packet
              if p.HasField("track_descriptor")}
    assert f"training run {tc.model_id}" in tracks.values()
    names = [p.track_event.name for p in msg.packet if p.HasField("track_event") and p.track_event.type == 1]
    assert {"create_model", "forward_backward", "optim_step", "save_weights"} <= set(names)
    begins = sum(p.track_event.type == 1 for p in msg.packet if p.HasField("track_event"))
    ends = sum(p.track_event.type == 2 for p in msg.packet if p.HasField("track_event"))
    assert begins == ends == len(names)
    with pytest.raises(tinker.NotFoundError):
        tinker.RestClient(base_url=server.url).export_session_trace("s-nope").result()
    assert httpx.get(url.replace("/session.pftrace", "x/session.pftrace")).status_code == 404


def test_cookbook_download_decrypts_an_age_encrypted_export(server, trained, tmp_path):
    from tinker_cookbook import weights

    _, _, state, _ = trained
    out = weights.download(tinker_path=state, output_dir=str(tmp_path / "adapter"), base_url=server.url)
    got = lora_io.read_peft_dir(out)
    svc = server.service
    row = svc.repo.checkpoint(state)
    want = lora_io.parse_peft_files(svc.checkpoints.read_files(row))
    assert got.base_model == TINY and got.weights.spec == want.weights.spec
    for path, (a, b) in want.weights.pairs.items():
        assert torch.equal(got.weights.pairs[path][0], a) and torch.equal(got.weights.pairs[path][1], b)
    # the temporary export was encrypted (only .age files) and is gone again
    exports = tinker_rows(svc, "checkpoints", kind="external")
    assert exports == []


def test_age_encrypted_export_files_and_bad_recipients(server, trained):
    import pyrage

    _, tc, _, _ = trained
    identity = pyrage.x25519.Identity.generate()
    path = tc.save_weights_external("enc", age_encryption_recipients=[str(identity.to_public())]).result().path
    rest = tinker.RestClient(base_url=server.url)
    urls = rest.get_external_weights_urls(path).result().urls
    assert sorted(urls) == ["adapter_config.json.age", "adapter_model.safetensors.age"]
    config = pyrage.decrypt(urllib.request.urlopen(urls["adapter_config.json.age"]).read(), [identity])
    assert b'"base_model_name_or_path"' in config
    with pytest.raises(pyrage.DecryptError):
        pyrage.decrypt(urllib.request.urlopen(urls["adapter_config.json.age"]).read(),
                       [pyrage.x25519.Identity.generate()])
    with pytest.raises(tinker.BadRequestError, match="age public key"):
        tc.save_weights_external("bad", age_encryption_recipients=["age1notakey"]).result()


def test_openai_api_under_oai_prefix(server):
    h = {"X-API-Key": "tml-x"}
    client = openai.OpenAI(base_url=f"{server.url}/oai/api/v1", api_key="tml-x")
    got = client.completions.create(model=TINY, prompt=[1, 2, 3], max_tokens=4, temperature=0.0, logprobs=1)
    want = httpx.post(f"{server.url}/v1/completions", headers=h, timeout=60, json={
        "model": TINY, "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0.0, "logprobs": 1}).json()
    assert got.choices[0].text == want["choices"][0]["text"]
    assert got.choices[0].logprobs.token_logprobs == pytest.approx(
        want["choices"][0]["logprobs"]["token_logprobs"], abs=1e-5)
    assert [m.id for m in client.models.list()] == [m["id"] for m in httpx.get(
        f"{server.url}/v1/models", headers=h).json()["data"]]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nobody/nothing", prompt="hi", max_tokens=1)
    assert e.value.body["type"] == "not_found_error"  # OpenAI's error shape, as on /v1
