"""--auth keys: API keys from the catalog map to tenants that cannot see each other's runs."""

from __future__ import annotations

import pytest
import tinker
from tinker import types

from lorafleet.cli.serve import check_auth
from lorafleet.errors import InvalidRequest
from tests.e2e.conftest import TINY, start_server
from tests.e2e.test_tinker_sdk_basic import BATCH


@pytest.fixture(scope="module")
def keyed(paths, tiny_pair, tmp_path_factory):
    live = start_server(paths, [TINY], tmp_path_factory.mktemp("keys"), engines={TINY: tiny_pair},
                        auth="keys", hold_s=5.0)
    yield live
    live.stop()


def test_tenants_are_isolated(keyed):
    catalog = keyed.app.state.catalog
    alice_key, bob_key = catalog.create_key("alice"), catalog.create_key("bob")
    assert alice_key.startswith("tml-")
    alice = tinker.ServiceClient(base_url=keyed.url, api_key=alice_key)
    bob = tinker.ServiceClient(base_url=keyed.url, api_key=bob_key)
    tc = alice.create_lora_training_client(base_model=TINY, rank=4).result()
    tc.forward_backward(BATCH, "cross_entropy").result()
    state = tc.save_state("mine").result().path
    sampler = tc.save_weights_for_sampler("mine").result().path

    bob_rest = tinker.RestClient(base_url=keyed.url, api_key=bob_key)
    assert tc.model_id not in [r.training_run_id for r in bob_rest.list_training_runs().result().training_runs]
    with pytest.raises(tinker.NotFoundError):
        bob_rest.get_training_run(tc.model_id).result()
    with pytest.raises(tinker.NotFoundError):
        bob.create_training_client_from_state(state).result()
    with pytest.raises(tinker.NotFoundError):
        bob.create_sampling_client(model_path=sampler).result()
    with pytest.raises(tinker.NotFoundError):
        bob_rest.delete_checkpoint_from_tinker_path(state).result()
    # published checkpoints are readable by others (weights_info, sampling)
    tinker.RestClient(base_url=keyed.url, api_key=alice_key).publish_checkpoint_from_tinker_path(
        sampler).result()
    sc = bob.create_sampling_client(model_path=sampler).result()
    assert sc.sample(types.ModelInput.from_ints([1, 2]), 1,
                     types.SamplingParams(max_tokens=2)).result().sequences


def test_unknown_key_is_401(keyed):
    with pytest.raises(tinker.AuthenticationError):
        tinker.RestClient(base_url=keyed.url, api_key="tml-not-a-key").list_training_runs().result()


def test_auth_none_refuses_non_loopback():
    check_auth("none", "127.0.0.1")
    check_auth("none", "localhost")
    check_auth("keys", "0.0.0.0")
    with pytest.raises(InvalidRequest, match="refuses"):
        check_auth("none", "0.0.0.0")
