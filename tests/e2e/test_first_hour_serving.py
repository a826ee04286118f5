"""From a Tinker run to an OpenAI `model` string by a name the user chose (issue 12): run
policies named by `user_metadata["policy"]`, `/v1/models?runs=false`, `models.retrieve`,
`/health`, and the message for a base this server does not load."""

from __future__ import annotations

import httpx
import openai
import pytest
from tinker import types

from tests.e2e.conftest import TINY
from tests.e2e.test_tinker_sdk_basic import BATCH


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="tml-x", max_retries=0)


def test_a_named_run_is_served_by_its_name_and_unnamed_runs_can_be_hidden(server, service_client):
    named = service_client.create_lora_training_client(
        base_model=TINY, rank=4, user_metadata={"policy": "first-hour"}).result()
    named.forward_backward(BATCH, "cross_entropy").result()
    named.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    named.save_weights_for_sampler("s1").result()
    unnamed = service_client.create_lora_training_client(base_model=TINY, rank=4).result()
    unnamed.save_weights_for_sampler("s1").result()

    client = _client(server)
    r = client.completions.create(model="local/first-hour", prompt="Hello", max_tokens=4, temperature=0)
    assert r.choices[0].text is not None
    card = client.models.retrieve("local/first-hour")
    assert (card.id, card.owned_by, card.root) == ("local/first-hour", "local", TINY)
    assert client.models.retrieve(TINY).id == TINY

    every = {m.id for m in client.models.list()}
    assert "local/first-hour" in every and any(m.startswith("local/tinker-") for m in every)
    runs_off = {m.id for m in client.models.list(extra_query={"runs": "false"})}
    assert runs_off == {m for m in every if not m.startswith("local/tinker-")}
    assert {TINY, "local/first-hour"} <= runs_off

    # a second run under a taken name is refused with the reason, not retried
    with pytest.raises(Exception, match="first-hour"):
        service_client.create_lora_training_client(
            base_model=TINY, rank=4, user_metadata={"policy": "first-hour"}).result()


def test_unknown_models_say_what_is_served(server):
    client = _client(server)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="Qwen/Qwen3-0.6B", prompt="Hi", max_tokens=2)
    assert "not served here" in str(e.value) and TINY in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("local/no-such-policy:prod")
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_a_run_resumed_from_a_named_run_gets_its_own_policy(server, service_client):
    tc = service_client.create_lora_training_client(
        base_model=TINY, rank=4, user_metadata={"policy": "resumable", "task": "demo"}).result()
    tc.forward_backward(BATCH, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    state = tc.save_state("s1").result().path
    resumed = service_client.create_training_client_from_state_with_optimizer(state).result()
    resumed.save_weights_for_sampler("after").result()  # publishes into the resumed run's policy
    named = service_client.create_training_client_from_state(
        state, user_metadata={"policy": "resumable-2"}).result()
    named.save_weights_for_sampler("after").result()
    client = _client(server)
    assert client.models.retrieve("local/resumable-2").id == "local/resumable-2"
    r = client.completions.create(model="local/resumable", prompt="Hi", max_tokens=2)
    assert r.choices[0].text is not None  # the original policy still serves its own revision


@pytest.mark.parametrize("name, message", [("bad name!", "invalid policy name"),
                                           ("bob/x", "cannot create policies of 'bob'")])
def test_a_bad_run_name_is_refused_at_once(service_client, name, message):
    with pytest.raises(Exception, match=message):
        service_client.create_lora_training_client(
            base_model=TINY, rank=4, user_metadata={"policy": name}).result()
