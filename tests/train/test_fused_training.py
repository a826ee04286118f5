"""Fused multi-adapter forward_backward: every adapter gets exactly its solo gradient."""

import pytest
import torch

from lorafleet.errors import BadTokens, InvalidRequest, MissingLossInput, NotFound, UnknownLoss
from lorafleet.lora.spec import LoraSpec
from lorafleet.train.types import AdamParams, Datum, FwdBwdRequest
from tests.helpers import assert_fused_equals_separate, grads, random_adapter, random_datum


SPECS = [
    LoraSpec(rank=4, alpha=8),
    LoraSpec(rank=8, alpha=16, target_modules=("q_proj", "v_proj")),
    LoraSpec(rank=1, alpha=2, target_modules=("down_proj", "o_proj"), use_rslora=True),
]


@pytest.mark.parametrize("loss", ["cross_entropy", "importance_sampling", "ppo", "cispo", "dro"])
def test_fused_gradients_equal_separate_runs(tiny_engine, loss):
    handles = [tiny_engine.create_adapter(s, weights=random_adapter(tiny_engine.info, s, seed=i)) for i, s in enumerate(SPECS)]
    reqs = [FwdBwdRequest(h, [random_datum(10 * i + j, 5 + 3 * j + i, loss) for j in range(2)], loss) for i, h in enumerate(handles)]
    assert_fused_equals_separate(tiny_engine, handles, reqs, rtol=1e-4, atol=1e-6)


def test_forward_only_leaves_no_gradient_and_matches_loss(tiny_engine):
    h = tiny_engine.create_adapter(SPECS[0], seed=1)
    d = random_datum(1, 7)
    (fo,) = tiny_engine.forward_backward([FwdBwdRequest(h, [d], forward_only=True)])
    assert not tiny_engine.has_grads(h)
    want = -(fo.outputs[0]["logprobs"] * d.loss_inputs["weights"]).sum()
    assert fo.metrics["loss:sum"] == pytest.approx(float(want), rel=1e-5)
    torch.testing.assert_close(fo.outputs[0]["elementwise_loss"], -fo.outputs[0]["logprobs"] * d.loss_inputs["weights"])


def test_gradients_accumulate_until_optim_step_and_loss_falls(tiny_engine):
    h = tiny_engine.create_adapter(LoraSpec(rank=8), seed=0)
    data = [Datum(d.tokens, {"target_tokens": d.loss_inputs["target_tokens"]}) for d in (random_datum(s, 12) for s in range(4))]
    first = tiny_engine.forward_backward([FwdBwdRequest(h, data[:2]), FwdBwdRequest(h, data[2:])])
    loss0 = sum(r.metrics["loss:sum"] for r in first)
    g_split = grads(tiny_engine, h)
    tiny_engine.discard_grads(h)
    tiny_engine.forward_backward([FwdBwdRequest(h, data)])
    for a, b in zip(g_split, grads(tiny_engine, h)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for _ in range(5):
        tiny_engine.optim_step(h, AdamParams(learning_rate=5e-3))
        tiny_engine.forward_backward([FwdBwdRequest(h, data)])
    tiny_engine.discard_grads(h)
    (after,) = tiny_engine.forward_backward([FwdBwdRequest(h, data, forward_only=True)])
    assert after.metrics["loss:sum"] < loss0 * 0.9


def test_optimizer_state_round_trip_gives_identical_next_step(tiny_engine):
    spec = LoraSpec(rank=4)
    h = tiny_engine.create_adapter(spec, seed=0)
    data = [random_datum(3, 9)]
    hp = AdamParams(learning_rate=1e-2, weight_decay=0.01, grad_clip_norm=1.0)
    for _ in range(2):
        tiny_engine.forward_backward([FwdBwdRequest(h, data)])
        tiny_engine.optim_step(h, hp)
    weights, opt = tiny_engine.get_weights(h), tiny_engine.optimizer_state(h)
    h2 = tiny_engine.create_adapter(spec, weights=weights)
    tiny_engine.load_optimizer_state(h2, opt)
    for handle in (h, h2):
        tiny_engine.forward_backward([FwdBwdRequest(handle, data)])
        tiny_engine.optim_step(handle, hp)
    for (a1, b1), (a2, b2) in zip(tiny_engine.get_weights(h).pairs.values(), tiny_engine.get_weights(h2).pairs.values()):
        assert torch.equal(a1, a2) and torch.equal(b1, b2)


def test_bad_training_input_gets_typed_errors(tiny_engine):
    h = tiny_engine.create_adapter(SPECS[0], seed=0)
    d = random_datum(0, 4)
    vocab = tiny_engine.info.vocab_size
    cases = [
        (FwdBwdRequest(h, [d], "nope"), UnknownLoss, "unknown loss_fn"),
        (FwdBwdRequest(h, [d], "ppo"), MissingLossInput, "needs loss_fn_inputs"),
        (FwdBwdRequest(h, []), InvalidRequest, "at least one datum"),
        (FwdBwdRequest(999, [d]), NotFound, "no adapter"),
        (FwdBwdRequest(h, [Datum(torch.tensor([1, vocab]), {"target_tokens": torch.tensor([1, 2])})]), BadTokens, "must be in"),
        (FwdBwdRequest(h, [Datum(torch.tensor([], dtype=torch.int64), {"target_tokens": torch.tensor([], dtype=torch.int64)})]), BadTokens, "non-empty"),
        (FwdBwdRequest(h, [Datum(torch.tensor([1, 2]), {"target_tokens": torch.tensor([1, 2, 3])})]), MissingLossInput, "expected \\(2,\\)"),
        (FwdBwdRequest(h, [Datum(torch.tensor([1.0, 2.0]), {"target_tokens": torch.tensor([1, 2])})]), BadTokens, "integers"),
    ]
    for req, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            tiny_engine.forward_backward([req])
    assert not tiny_engine.has_grads(h)
    with pytest.raises(InvalidRequest, match="learning_rate"):
        tiny_engine.optim_step(h, AdamParams(learning_rate=float("nan")))


def test_optimizer_state_is_keyed_by_name_not_position(tiny_engine):
    """Tensors read back from a sorted safetensors file must still meet their Adam moments."""
    spec = LoraSpec(rank=2, target_modules=("q_proj", "down_proj"))
    h = tiny_engine.create_adapter(spec, seed=0)
    tiny_engine.forward_backward([FwdBwdRequest(h, [random_datum(1, 6)])])
    tiny_engine.optim_step(h, AdamParams(learning_rate=1e-2))
    tensors, opt = tiny_engine.get_tensors(h), tiny_engine.optimizer_state(h)
    h2 = tiny_engine.create_adapter(spec, seed=1)
    tiny_engine.set_tensors(h2, dict(sorted(tensors.items(), reverse=True)))
    tiny_engine.load_optimizer_state(h2, opt)
    for handle in (h, h2):
        tiny_engine.forward_backward([FwdBwdRequest(handle, [random_datum(2, 6)])])
        tiny_engine.optim_step(handle, AdamParams(learning_rate=1e-2))
    for k, v in tiny_engine.get_tensors(h).items():
        assert torch.equal(v, tiny_engine.get_tensors(h2)[k])
