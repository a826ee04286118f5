"""The GRPO recipe's plumbing against a real server on loopback (tiny-llama, a few steps).

What it proves: rewards and group-relative advantages are computed; every step's sampler
revision lands in the catalog with provenance (and the best one gets an evaluation and the
alias `best`); after a handoff the sampler serves the newest weights; two policies trained
concurrently never read each other's weights.
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from recipes import grpo
from tests.e2e.conftest import TINY, start_server


def test_reward_needs_strict_format_and_right_value():
    assert grpo.reward("12", 12) == 1.0
    assert grpo.reward(" 12\n", 12) == 1.0
    assert grpo.reward("-3", -3) == 1.0
    assert grpo.reward("13", 12) == 0.5  # format only
    assert grpo.reward("The answer is 12", 12) == 0.5  # value only
    assert grpo.reward("12.", 12) == 0.5
    assert grpo.reward("twelve", 12) == 0.0


def test_group_advantages_are_relative_to_their_own_group():
    assert grpo.group_advantages([1.0, 0.0, 0.5, 0.5]) == pytest.approx([0.5, -0.5, 0.0, 0.0])
    assert grpo.group_advantages([0.5, 0.5, 0.5]) == [0.0, 0.0, 0.0]  # no signal
    # same spread, different level: same advantages (the group mean is the baseline)
    assert grpo.group_advantages([1.0, 0.5]) == grpo.group_advantages([0.5, 0.0])


@pytest.fixture(scope="module")
def server(paths, tmp_path_factory):
    live = start_server(paths, [TINY], tmp_path_factory.mktemp("grpo"), hold_s=5.0, gap_timeout_s=5.0)
    yield live
    live.stop()


def test_short_run_publishes_every_step_with_provenance(server, tmp_path):
    cfg = grpo.Config(base_url=server.url, base_model=TINY, policies=2, steps=2, group_size=3,
                      batch_size=1, rank=4, max_tokens=3, learning_rate=1e-2, out=tmp_path,
                      name_prefix="t", quiet=True)
    policies = asyncio.run(grpo.train(cfg))
    assert [len(p.rewards) for p in policies] == [2, 2]
    assert all(0.0 <= r <= 1.0 for p in policies for r in p.rewards)
    grpo.save_outputs(cfg, policies)
    assert (tmp_path / "rewards.csv").read_text().count("\n") == 3
    best = grpo.record_best(cfg, policies)

    with httpx.Client(base_url=server.url, headers={"X-API-Key": "tml-local"}) as http:
        owners = set()
        for p, b in zip(policies, best):
            revs = [http.get("/catalog/v1/resolve", params={"ref": path}).raise_for_status().json()
                    for path in p.paths]
            assert len({r["id"] for r in revs}) == 2 and {r["tinker_path"] for r in revs} == set(p.paths)
            policy = revs[0]["policy"]
            assert {r["policy"] for r in revs} == {policy}
            owners.add(policy)
            listed = http.get(f"/catalog/v1/policies/{policy}/revisions").raise_for_status().json()
            assert {r["id"] for r in revs} <= {r["id"] for r in listed["items"]}
            # the step-1 revision descends from the step-0 one
            assert revs[1]["seq"] > revs[0]["seq"]
            meta = http.get(f"/catalog/v1/policies/{policy}").raise_for_status().json()
            assert meta["metadata"]["recipe"] == "grpo" and meta["metadata"]["task"] == p.op
            aliases = {a["name"]: a for a in http.get(f"/catalog/v1/policies/{policy}/aliases").json()}
            best_rev = http.get("/catalog/v1/resolve", params={"ref": b["ref"]}).json()
            assert aliases["best"]["revision_id"] == best_rev["id"]
            evals = http.get("/catalog/v1/evaluations", params={"ref": b["ref"]}).raise_for_status().json()
            assert any(e["suite"] == f"grpo-{p.op}" for e in evals)
        assert len(owners) == 2  # one catalog policy per training run


async def _handoff(service, training, tokenizer, seed_advantage: float, fixed: list[int]):
    """Sample on the current weights, take one GRPO-style step, hand off; return logprobs."""
    saved = await training.save_weights_for_sampler("before")
    before = await service.create_sampling_client(model_path=saved.path)
    lp_before = await before.compute_logprobs(types.ModelInput.from_ints(fixed))
    prompt = grpo.prompt_tokens(tokenizer, "What is 2 + 3? Answer with just the number.")
    res = await before.sample(types.ModelInput.from_ints(prompt), num_samples=2,
                              sampling_params=types.SamplingParams(max_tokens=4, temperature=1.0))
    data = [grpo.build_datum(prompt, list(s.tokens), list(s.logprobs), adv)
            for s, adv in zip(res.sequences, [seed_advantage, -seed_advantage])]
    await training.forward_backward(data, "importance_sampling")
    await training.optim_step(types.AdamParams(learning_rate=5e-2))
    saved = await training.save_weights_for_sampler("after")
    after = await service.create_sampling_client(model_path=saved.path)
    lp_after = await after.compute_logprobs(types.ModelInput.from_ints(fixed))
    return np.array(lp_before[1:]), np.array(lp_after[1:])


async def _forward_logprobs(training, fixed: list[int]) -> np.ndarray:
    out = await training.forward([types.Datum(model_input=types.ModelInput.from_ints(fixed[:-1]),
                                              loss_fn_inputs={"target_tokens": fixed[1:]})], "cross_entropy")
    return out.loss_fn_outputs[0]["logprobs"].to_numpy()


def test_handoff_serves_newest_weights_and_policies_stay_apart(server):
    async def main():
        service = tinker.ServiceClient(base_url=server.url)
        a, b = await asyncio.gather(*[service.create_lora_training_client(base_model=TINY, rank=4, seed=s)
                                      for s in (1, 2)])
        tok = a.get_tokenizer()
        fixed = grpo.prompt_tokens(tok, "What is 4 * 2? Answer with just the number.") + tok.encode("8")
        # both policies step concurrently (fused forward_backward, shared decode batches)
        (a0, a1), (b0, b1) = await asyncio.gather(_handoff(service, a, tok, 1.0, fixed),
                                                  _handoff(service, b, tok, -1.0, fixed))
        fa, fb = await asyncio.gather(_forward_logprobs(a, fixed), _forward_logprobs(b, fixed))
        return a0, a1, b0, b1, fa, fb

    a0, a1, b0, b1, fa, fb = asyncio.run(main())
    np.testing.assert_allclose(a0, b0, atol=1e-6)  # LoRA B starts at zero: both equal the base
    assert np.abs(a1 - a0).max() > 1e-3 and np.abs(b1 - b0).max() > 1e-3  # handoff: new weights
    np.testing.assert_allclose(a1, fa, atol=1e-4)  # each sampler = its own run's weights ...
    np.testing.assert_allclose(b1, fb, atol=1e-4)
    assert np.abs(a1 - b1).max() > 1e-3  # ... and not the other's
