"""What the SDK trains is servable over the OpenAI API at once: the runner's serving queue
samples catalog revisions (by tinker:// path) in the same engine batches as Tinker samples."""

from __future__ import annotations

import httpx
from tinker import types

from tests.e2e.conftest import TINY
from tests.e2e.test_tinker_sdk_basic import BATCH


def test_sampler_checkpoint_is_served_over_openai_api(server, service_client):
    tc = service_client.create_lora_training_client(base_model=TINY, rank=4).result()
    tc.forward_backward(BATCH, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    path = tc.save_weights_for_sampler("served").result().path
    h = {"X-API-Key": "tml-x"}
    for model in (path, TINY):
        r = httpx.post(f"{server.url}/v1/completions", headers=h, timeout=60, json={
            "model": model, "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0.0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] is not None
    # greedy tokens from the OpenAI route match the Tinker sampler on the same weights
    sc = service_client.create_sampling_client(model_path=path).result()
    want = sc.sample(types.ModelInput.from_ints([1, 2, 3]), 1,
                     types.SamplingParams(max_tokens=4, temperature=0.0)).result().sequences[0]
    r = httpx.post(f"{server.url}/v1/completions", headers=h, timeout=60, json={
        "model": path, "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0.0, "logprobs": 1})
    lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert [round(x, 3) for x in lps] == [round(x, 3) for x in want.logprobs]
    assert httpx.get(f"{server.url}/metrics").status_code == 200
