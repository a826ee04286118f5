"""Distillation and GSPO through the real tinker SDK on loopback (tiny base): top-k prompt
logprobs and the other prompt scores against the model's own log_softmax, 2-D (N, K) targets
against K weighted 1-D steps, GSPO against a torch reference, and the refusals that say what
to do instead."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from lorafleet.train.losses import STABLE_REINFORCE
from tests.e2e.conftest import TINY
from tests.e2e.test_tinker_sdk_basic import BATCH

DOCS = Path(__file__).resolve().parents[2] / "docs" / "tinker.md"
PROMPT = [1, 5, 9, 13, 17, 21, 25, 29, 33]
ADAM = types.AdamParams(learning_rate=1e-2, eps=1e-8)


def _base_logprobs(tiny_pair, prompt=PROMPT) -> torch.Tensor:
    """log_softmax of the base model's logits at every prompt position (the engine's model)."""
    base, _ = tiny_pair
    with torch.no_grad():
        logits = base.model(input_ids=torch.tensor([prompt])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _grads(server, model_id: str) -> list[torch.Tensor]:
    """The gradients a run has accumulated in the server's engine (its A/B leaves)."""
    runner = server.service.runners[TINY]
    handle = runner.runs[model_id].handle
    return [p.grad.clone() for p in runner.engine._live(handle).params]


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to fp32 tolerance: summation order differs (one fused gather vs K calls)."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-12)


def test_topk_prompt_logprobs_equal_a_log_softmax_topk_of_the_forward(server, service_client, tiny_pair):
    sc = service_client.create_sampling_client(base_model=TINY).result()
    res = sc.sample(types.ModelInput.from_ints(PROMPT), 2, types.SamplingParams(max_tokens=1, temperature=0),
                    include_prompt_logprobs=True, topk_prompt_logprobs=5).result()
    lp = _base_logprobs(tiny_pair)
    want_v, want_i = lp[:-1].topk(5, dim=-1)
    topk = res.topk_prompt_logprobs
    assert len(topk) == len(PROMPT) and topk[0] is None
    for i in range(1, len(PROMPT)):
        assert [t for t, _ in topk[i]] == want_i[i - 1].tolist()
        np.testing.assert_allclose([v for _, v in topk[i]], want_v[i - 1].numpy(), atol=1e-5)
        assert res.prompt_logprobs[i] == pytest.approx(float(lp[i - 1, PROMPT[i]]), abs=1e-5)
    assert res.prompt_logprobs[0] is None
    # greedy: both samples are the argmax after the prompt, answered from the same forward
    assert [s.tokens for s in res.sequences] == [[int(lp[-1].argmax())]] * 2
    assert res.sequences[0].logprobs[0] == pytest.approx(float(lp[-1].max()), abs=1e-5)


def test_trained_sampler_topk_equals_the_training_forward_of_2d_targets(server, service_client):
    """A trained adapter (with its LM-head LoRA) gives the same top-k through the sampler's
    slots as a training forward of those K ids as (N, K) targets."""
    tc = service_client.create_lora_training_client(base_model=TINY, rank=4).result()
    tc.forward_backward(BATCH, "cross_entropy").result()
    tc.optim_step(ADAM).result()
    sc = tc.save_weights_and_get_sampling_client().result()
    res = sc.sample(types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=3),
                    topk_prompt_logprobs=4).result()  # max_tokens > 1: scored, then decoded
    assert len(res.sequences[0].tokens) == 3 and res.prompt_logprobs is None
    ids = np.array([[t for t, _ in row] for row in res.topk_prompt_logprobs[1:]], dtype=np.int64)
    values = np.array([[v for _, v in row] for row in res.topk_prompt_logprobs[1:]], dtype=np.float32)
    n = len(PROMPT) - 1
    datum = types.Datum(model_input=types.ModelInput.from_ints(PROMPT[:-1]),
                        loss_fn_inputs={"target_tokens": ids, "weights": np.zeros((n, 4), np.float32)})
    out = tc.forward([datum], "cross_entropy").result()
    got = out.loss_fn_outputs[0]["logprobs"]
    assert got.shape == [n, 4]
    np.testing.assert_allclose(got.to_numpy(), values, atol=1e-4)


def test_target_prompt_logprobs_last_n_and_alternative_draws(server, service_client, tiny_pair):
    sc = service_client.create_sampling_client(base_model=TINY).result()
    lp = _base_logprobs(tiny_pair)
    n = len(PROMPT) - 1
    ids = torch.full((n, 3), -1, dtype=torch.int64)
    ids[2] = torch.tensor([4, 5, 6])
    ids[5, 1] = 7
    for target in (types.TensorData.from_torch_sparse(ids, pad_value=-1), types.TensorData.from_torch(ids)):
        res = sc.sample(types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=1, seed=3),
                        include_prompt_logprobs=True, target_prompt_logprobs=target,
                        prompt_logprobs_last_n=3, prompt_alt_tokens_k=4).result()
        got = res.target_prompt_logprobs.to_torch()
        assert list(got.shape) == [n, 3]
        want = torch.where(ids >= 0, lp[:-1].gather(1, ids.clamp(min=0)), torch.zeros(()))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert res.prompt_logprobs[:-3] == [None] * (len(PROMPT) - 3)
        np.testing.assert_allclose(res.prompt_logprobs[-3:], [float(lp[i - 1, PROMPT[i]]) for i in range(n - 2, n + 1)],
                                   atol=1e-5)
        alt = res.prompt_alt_tokens
        tokens, alt_lps = alt.tokens.to_torch(), alt.logprobs.to_torch()
        assert list(tokens.shape) == [n, 4]
        torch.testing.assert_close(alt_lps, lp[:-1].gather(1, tokens), atol=1e-5, rtol=0)
    again = sc.sample(types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=1, seed=3),
                      prompt_alt_tokens_k=4).result()
    assert torch.equal(again.prompt_alt_tokens.tokens.to_torch(), tokens)  # seeded draws repeat


@pytest.mark.parametrize("field, value, message", [
    ("prompt_logprobs_last_n", 99, r"between 1 and len\(prompt\) - 1 = 8, got 99"),
    ("topk_prompt_logprobs", 5000, "at most 1024"),
])
def test_bad_prompt_score_requests_are_400(server, service_client, field, value, message):
    sc = service_client.create_sampling_client(base_model=TINY).result()
    with pytest.raises(tinker.BadRequestError, match=message):
        sc.sample(types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=1),
                  include_prompt_logprobs=True, **{field: value}).result()


def _twin_runs(service_client, seed=11, n=2):
    """Runs with identical initial weights (same seed)."""
    return [service_client.create_lora_training_client(base_model=TINY, rank=4, seed=seed).result()
            for _ in range(n)]


def test_2d_targets_step_equals_the_sum_of_k_weighted_1d_steps(server, service_client):
    a, b = _twin_runs(service_client)
    rng = np.random.default_rng(0)
    tokens = [1, 5, 9, 13, 17, 21, 25]
    n, k = len(tokens) - 1, 3
    targets = rng.integers(0, 49152, size=(n, k)).astype(np.int64)
    weights = rng.random((n, k)).astype(np.float32)
    weights[0] = 0.0  # a masked position
    inp = types.ModelInput.from_ints(tokens[:-1])
    fb = a.forward_backward([types.Datum(model_input=inp, loss_fn_inputs={
        "target_tokens": targets, "weights": weights})], "cross_entropy").result()
    lps = fb.loss_fn_outputs[0]["logprobs"].to_numpy()
    assert lps.shape == (n, k)
    total = 0.0
    for j in range(k):  # K separate 1-D calls accumulate into b's gradients
        out = b.forward_backward([types.Datum(model_input=inp, loss_fn_inputs={
            "target_tokens": targets[:, j].copy(), "weights": weights[:, j].copy()})], "cross_entropy").result()
        np.testing.assert_allclose(out.loss_fn_outputs[0]["logprobs"].to_numpy(), lps[:, j], atol=1e-5)
        total += out.metrics["loss:sum"]
    assert fb.metrics["loss:sum"] == pytest.approx(-(lps * weights).sum(), rel=1e-5)
    assert fb.metrics["loss:sum"] == pytest.approx(total, rel=1e-5)
    for ga, gb in zip(_grads(server, a.model_id), _grads(server, b.model_id)):
        _close(ga, gb)
    assert any(g.abs().sum() > 0 for g in _grads(server, a.model_id))


def test_2d_and_1d_datums_share_one_request(server, service_client):
    tc = service_client.create_lora_training_client(base_model=TINY, rank=4).result()
    two_d = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={
        "target_tokens": np.array([[2, 4], [3, 5], [4, 6]], np.int64)})
    fb = tc.forward_backward([BATCH[0], two_d, BATCH[1]], "cross_entropy").result()
    shapes = [o["logprobs"].shape for o in fb.loss_fn_outputs]
    assert shapes == [[5], [3, 2], [3]]
    with pytest.raises(tinker.BadRequestError, match=r"2-D \(N, K\) targets are taken by \['cross_entropy'\] only"):
        tc.forward_backward([types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={
            "target_tokens": np.array([[2, 4], [3, 5], [4, 6]], np.int64),
            "logprobs": np.zeros(3, np.float32), "advantages": np.ones(3, np.float32)})], "ppo").result()
    with pytest.raises(tinker.BadRequestError, match="expected \\(3, 2\\), the shape of target_tokens"):
        tc.forward_backward([types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={
            "target_tokens": np.array([[2, 4], [3, 5], [4, 6]], np.int64),
            "weights": np.ones(3, np.float32)})], "cross_entropy").result()


def _gspo_reference(lp: torch.Tensor, slp, adv, mask, lo=0.8, hi=1.2) -> torch.Tensor:
    """Tinker's published GSPO-token, written out."""
    in_ratio = mask != 0
    log_ratio = (lp.detach() - slp)[in_ratio].mean()
    ratio = torch.exp(log_ratio + lp - lp.detach())
    clipped = torch.clamp(ratio, lo, hi)
    return -torch.minimum(ratio * adv, clipped * adv).sum()


def test_gspo_equals_a_torch_reference_fused_with_other_runs(server, service_client):
    g, ref = _twin_runs(service_client, seed=5)
    other = service_client.create_lora_training_client(base_model=TINY, rank=2).result()
    tokens = [3, 8, 13, 18, 23, 28, 33, 38]
    inp = types.ModelInput.from_ints(tokens[:-1])
    target = np.array(tokens[1:], np.int64)
    lp0 = torch.from_numpy(g.forward([types.Datum(model_input=inp, loss_fn_inputs={"target_tokens": target})],
                                     "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy())
    n = len(target)
    slp = (lp0 + torch.linspace(-0.3, 0.2, n)).float()  # sampling logprobs off the current policy
    adv = torch.tensor([0, 0, 1.0, 1.0, -0.5, -0.5, 2.0])
    mask = torch.tensor([0, 0, 1, 1, 1, 1, 1.0])
    # the sequence ratio is exp(mean(lp - slp)) ~ 0.967: the second config clips it from below
    for cfg in ({}, {"clip_low_threshold": 0.98, "clip_high_threshold": 1.02}):
        inputs = {"target_tokens": target, "logprobs": slp.numpy(), "advantages": adv.numpy(),
                  "sequence_ratio_mask": mask.numpy()}
        results = {}
        # the GSPO run and an unrelated cross_entropy run are submitted together (fused)
        t = threading.Thread(target=lambda: results.setdefault("other", other.forward_backward(BATCH, "cross_entropy").result()))
        t.start()
        fb = g.forward_backward([types.Datum(model_input=inp, loss_fn_inputs=inputs)], "gspo",
                                loss_fn_config=cfg or None).result()
        t.join()
        lp = lp0.clone().requires_grad_()
        want = _gspo_reference(lp, slp, adv, mask, cfg.get("clip_low_threshold", 0.8), cfg.get("clip_high_threshold", 1.2))
        assert fb.metrics["loss:sum"] == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6)
        want.backward()
        # the same gradient as cross_entropy with weights -dL/dlp (the chain rule through lp)
        ref.forward_backward([types.Datum(model_input=inp, loss_fn_inputs={
            "target_tokens": target, "weights": (-lp.grad).numpy().astype(np.float32)})], "cross_entropy").result()
        for a, b in zip(_grads(server, g.model_id), _grads(server, ref.model_id)):
            _close(a, b)
    with pytest.raises(tinker.BadRequestError, match="sequence_ratio_mask'\\] marks no token"):
        g.forward_backward([types.Datum(model_input=inp, loss_fn_inputs={
            **inputs, "sequence_ratio_mask": np.zeros(n, np.float32)})], "gspo").result()


def test_stable_reinforce_dimuon_and_stability_info_are_refused_with_what_to_do(server, service_client):
    tc = service_client.create_lora_training_client(base_model=TINY, rank=2).result()
    d = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={
        "target_tokens": np.array([2, 3, 4], np.int64), "logprobs": np.zeros(3, np.float32),
        "advantages": np.ones(3, np.float32)})
    with pytest.raises(tinker.BadRequestError) as e:
        tc.forward_backward([d], "stable_reinforce").result()
    msg = str(e.value)
    assert all(x in msg for x in ("'importance_sampling'", "'cispo'", "'gspo'", "loss_fn=importance_sampling"))
    assert STABLE_REINFORCE in msg and STABLE_REINFORCE in DOCS.read_text()  # the page quotes it exactly
    sc = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
    with pytest.raises(tinker.BadRequestError, match="record_stability_info is not supported.*'gspo'"):
        sc.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2)).result()
    with pytest.raises(tinker.BadRequestError, match="optimizer 'dimuon' is not supported.*AdamParams"):
        service_client.create_lora_training_client(base_model=TINY, rank=2,
                                                   optimizer=types.DimuonOptimizerConfig()).result()
