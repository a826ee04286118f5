"""Each loss against its formula in tinker_protocol.md §6.5, written out by hand."""

import math

import pytest
import torch

from lorafleet.errors import InvalidRequest, MissingLossInput, UnknownLoss
from lorafleet.train import losses

LP = torch.tensor([-0.5, -1.0, -2.0, -0.1])
SLP = torch.tensor([-0.6, -0.7, -2.0, -1.0])
ADV = torch.tensor([1.0, -2.0, 0.0, 0.5])
INPUTS = {"target_tokens": torch.tensor([1, 2, 3, 4]), "logprobs": SLP, "advantages": ADV}


def _loss(name, inputs=INPUTS, config=None):
    return losses.elementwise_loss(name, LP, inputs, losses.resolve_config(name, config or {}))


def test_cross_entropy_with_real_valued_weights():
    w = torch.tensor([1.0, -0.5, 0.0, 2.0])
    got = _loss("cross_entropy", {"target_tokens": INPUTS["target_tokens"], "weights": w})
    assert got.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.2])


def test_importance_sampling():
    want = [-math.exp(lp - s) * a for lp, s, a in zip(LP.tolist(), SLP.tolist(), ADV.tolist())]
    assert _loss("importance_sampling").tolist() == pytest.approx(want, rel=1e-6)


def test_ppo_clips_the_ratio():
    want = []
    for lp, s, a in zip(LP.tolist(), SLP.tolist(), ADV.tolist()):
        r = math.exp(lp - s)
        want.append(-min(r * a, min(max(r, 0.9), 1.1) * a))
    got = _loss("ppo", config={"clip_low_threshold": 0.9, "clip_high_threshold": 1.1})
    assert got.tolist() == pytest.approx(want, rel=1e-6)


def test_cispo_stops_gradient_through_the_clipped_ratio():
    lp = LP.clone().requires_grad_()
    cfg = losses.resolve_config("cispo", {})
    losses.elementwise_loss("cispo", lp, INPUTS, cfg).sum().backward()
    ratio = torch.exp(LP - SLP).clamp(0.8, 1.2)
    torch.testing.assert_close(lp.grad, -ratio * ADV)


def test_dro():
    got = _loss("dro", config={"beta": 0.3})
    want = -(LP * ADV - 0.5 * 0.3 * (LP - SLP) ** 2)
    torch.testing.assert_close(got, want)


def test_per_token_clip_thresholds_override_config():
    inputs = dict(INPUTS, clip_low_threshold=torch.full((4,), 1.0), clip_high_threshold=torch.full((4,), 1.0))
    got = _loss("ppo", inputs)
    want = [-min(math.exp(lp - s) * a, a) for lp, s, a in zip(LP.tolist(), SLP.tolist(), ADV.tolist())]
    assert got.tolist() == pytest.approx(want, rel=1e-6)


def test_bad_loss_requests():
    with pytest.raises(UnknownLoss, match="unknown loss_fn 'nope'"):
        losses.resolve_config("nope", {})
    with pytest.raises(InvalidRequest, match="do not apply"):
        losses.resolve_config("importance_sampling", {"beta": 1.0})
    with pytest.raises(MissingLossInput, match="needs loss_fn_inputs\\['advantages'\\]"):
        losses.check_inputs("ppo", 4, {"target_tokens": INPUTS["target_tokens"], "logprobs": SLP})
    with pytest.raises(MissingLossInput, match="expected \\(5,\\)"):
        losses.check_inputs("importance_sampling", 5, INPUTS)


def test_cross_entropy_takes_2d_targets_and_weights():
    lp = torch.tensor([[-0.5, -1.0], [-2.0, -0.1]])
    w = torch.tensor([[0.7, 0.3], [0.0, 1.0]])
    inputs = {"target_tokens": torch.tensor([[1, 2], [3, 4]]), "weights": w}
    losses.check_inputs("cross_entropy", 2, inputs)
    got = losses.elementwise_loss("cross_entropy", lp, inputs, {})
    torch.testing.assert_close(got, -lp * w)
    with pytest.raises(MissingLossInput, match="the shape of target_tokens"):
        losses.check_inputs("cross_entropy", 2, {"target_tokens": inputs["target_tokens"], "weights": torch.ones(2)})
    with pytest.raises(MissingLossInput, match=r"taken by \['cross_entropy'\] only"):
        losses.check_inputs("ppo", 2, {"target_tokens": inputs["target_tokens"], "logprobs": torch.zeros(2),
                                       "advantages": torch.ones(2)})


def test_gspo_sequence_ratio_value_and_per_token_gradient():
    mask = torch.tensor([0.0, 1.0, 1.0, 1.0])
    inputs = dict(INPUTS, sequence_ratio_mask=mask)
    lp = LP.clone().requires_grad_()
    loss = losses.elementwise_loss("gspo", lp, inputs, losses.resolve_config("gspo", {}))
    seq = float(((LP - SLP) * mask).sum() / mask.sum())
    s = math.exp(seq)
    want = [-min(s * a, min(max(s, 0.8), 1.2) * a) for a in ADV.tolist()]
    assert loss.tolist() == pytest.approx(want, rel=1e-6)
    loss.sum().backward()
    unclipped = [1.0 if s * a <= min(max(s, 0.8), 1.2) * a else 0.0 for a in ADV.tolist()]
    assert lp.grad.tolist() == pytest.approx([-s * a * u for a, u in zip(ADV.tolist(), unclipped)], rel=1e-6)
    with pytest.raises(MissingLossInput, match="marks no token"):
        losses.check_inputs("gspo", 4, dict(INPUTS, sequence_ratio_mask=torch.zeros(4)))


def test_stable_reinforce_and_custom_are_refused_with_the_alternatives():
    with pytest.raises(UnknownLoss, match="'importance_sampling', 'cispo' or 'gspo'"):
        losses.resolve_config("stable_reinforce", {})
    with pytest.raises(UnknownLoss, match="forward_backward_custom"):
        losses.resolve_config("custom", {})
