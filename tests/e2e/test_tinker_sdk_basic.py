"""The real tinker SDK 0.38 against a real lorafleet server on loopback (tiny base)."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import TINY


def datum(tokens: list[int], weights: list[float] | None = None) -> types.Datum:
    inp, tgt = tokens[:-1], tokens[1:]
    w = weights or [1.0] * len(tgt)
    return types.Datum(
        model_input=types.ModelInput.from_ints(inp),
        loss_fn_inputs={"target_tokens": np.asarray(tgt, dtype=np.int64),
                        "weights": np.asarray(w, dtype=np.float32)},
    )


def rl_datum(prompt: list[int], completion: list[int], logprobs: list[float], adv: float) -> types.Datum:
    tokens = prompt + completion
    n = len(tokens) - 1
    p = len(prompt) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": np.asarray(tokens[1:], dtype=np.int64),
            "logprobs": np.asarray([0.0] * p + logprobs, dtype=np.float32)[:n],
            "advantages": np.asarray([0.0] * p + [adv] * len(completion), dtype=np.float32)[:n],
        },
    )


BATCH = [datum([1, 5, 9, 13, 17, 21]), datum([2, 4, 6, 8])]


def test_capabilities_and_training_step(server, service_client):
    caps = tinker.RestClient(base_url=server.url).get_server_capabilities().result()
    assert TINY in [m.model_name for m in caps.supported_models]

    tc = service_client.create_lora_training_client(base_model=TINY, rank=4).result()
    assert tc.model_id.endswith(":train:0")
    info = tc.get_info()
    assert info.model_data.model_name == TINY and info.lora_rank == 4
    assert tc.get_tokenizer() is not None  # a local tokenizer directory, offline
    fb = tc.forward_backward(BATCH, "cross_entropy").result()
    assert len(fb.loss_fn_outputs) == 2
    assert fb.loss_fn_outputs[0]["logprobs"].shape == [5]
    assert fb.metrics["loss:sum"] == pytest.approx(
        -sum(float(o["logprobs"].to_numpy().sum()) for o in fb.loss_fn_outputs), rel=1e-4)
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    fb2 = tc.forward(BATCH, "cross_entropy").result()
    assert fb2.metrics["loss:sum"] < fb.metrics["loss:sum"]


def test_chunked_forward_backward_is_ordered_and_fused(server, service_client, monkeypatch):
    tc = service_client.create_lora_training_client(base_model=TINY, rank=4).result()
    # one request per datum, all sent concurrently (first chunk last)
    holder = tc.holder
    holder._client_config = holder._client_config.model_copy(update={"fwdbwd_max_chunk_len": 1})
    batch = [datum([3 + i, 7, 11 + i, 15]) for i in range(4)]
    fb = tc.forward_backward(batch, "cross_entropy").result()
    assert len(fb.loss_fn_outputs) == 4
    stats = server.service.runners[TINY].stats
    assert stats["fused_requests"] > stats["fused_calls"]  # chunks ran together
    fwd = tc.forward(batch, "cross_entropy").result()
    np.testing.assert_allclose(fb.metrics["loss:sum"], fwd.metrics["loss:sum"], rtol=1e-5)


def test_rl_losses_and_sampling_logprobs_agree(server, service_client):
    tc = service_client.create_lora_training_client(base_model=TINY, rank=4).result()
    tc.forward_backward(BATCH, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    sc = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints([1, 2, 3, 4])
    res = sc.sample(prompt, num_samples=3,
                    sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0)).result()
    assert len(res.sequences) == 3
    for seq in res.sequences:
        assert seq.logprobs is not None and len(seq.logprobs) == len(seq.tokens)
        assert seq.stop_reason in ("stop", "length") and seq.sequence_id
    seq = res.sequences[0]
    fwd = tc.forward([datum([1, 2, 3, 4] + list(seq.tokens))], "cross_entropy").result()
    lp = fwd.loss_fn_outputs[0]["logprobs"].to_numpy()[-len(seq.tokens):]
    np.testing.assert_allclose(lp, np.asarray(seq.logprobs), atol=1e-4)
    plp = sc.compute_logprobs(types.ModelInput.from_ints([1, 2, 3, 4] + list(seq.tokens))).result()
    assert plp[0] is None
    np.testing.assert_allclose(plp[-len(seq.tokens):], lp, atol=1e-4)

    data = [rl_datum([1, 2, 3, 4], list(s.tokens), list(s.logprobs), adv)
            for s, adv in zip(res.sequences, [1.0, -1.0, 0.5])]
    for loss, cfg in [("importance_sampling", None), ("ppo", {"clip_low_threshold": 0.7}),
                      ("cispo", None), ("dro", {"beta": 0.1})]:
        out = tc.forward_backward(data, loss, loss_fn_config=cfg).result()
        assert "loss:sum" in out.metrics and len(out.loss_fn_outputs) == 3
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()


def test_forward_backward_custom(server, service_client):
    tc = service_client.create_lora_training_client(base_model=TINY, rank=4).result()

    def loss_fn(data, logprobs_list):
        loss = sum((-lp * lp.detach().exp()).sum() for lp in logprobs_list)
        return loss, {"custom": float(loss)}

    out = tc.forward_backward_custom(BATCH, loss_fn).result()
    assert "loss:sum" in out.metrics
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()


def test_sampling_stops_and_base_model_sampling(server, service_client):
    sc = service_client.create_sampling_client(base_model=TINY)
    prompt = types.ModelInput.from_ints([5, 6, 7])
    res = sc.sample(prompt, num_samples=4, sampling_params=types.SamplingParams(
        max_tokens=8, temperature=1.0, seed=3, stop=[]),).result()
    assert all(s.stop_reason == "length" and len(s.tokens) == 8 for s in res.sequences)
    first = res.sequences[0].tokens[0]
    res = sc.sample(prompt, num_samples=1, sampling_params=types.SamplingParams(
        max_tokens=8, temperature=1.0, seed=3, stop=[first])).result()
    assert res.sequences[0].stop_reason == "stop" and res.sequences[0].tokens[-1] == first
    res = sc.sample(prompt, num_samples=2, sampling_params=types.SamplingParams(
        max_tokens=8, stop=["\n"])).result()
    assert len(res.sequences) == 2
