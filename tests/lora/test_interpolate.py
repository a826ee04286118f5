"""Adapter interpolation math (lora/interpolate.py) against a dense torch reference."""

from __future__ import annotations

import pytest
import torch

from lorafleet.errors import IncompatibleAdapter
from lorafleet.lora.interpolate import combine, interpolate
from lorafleet.lora.spec import MAX_RANK, LoraSpec
from lorafleet.lora.weights import LoraWeights


def adapter(seed: int, rank: int = 4, alpha: float = 8.0, rslora: bool = False) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    spec = LoraSpec(rank=rank, alpha=alpha, target_modules=("q_proj", "up_proj"), use_rslora=rslora)
    return LoraWeights(spec, {
        "model.layers.0.self_attn.q_proj": (torch.randn(rank, 16, generator=g), torch.randn(12, rank, generator=g)),
        # a packed MoE pair: one (A, B) per expert
        "model.layers.0.mlp.experts.up_proj": (torch.randn(3, rank, 16, generator=g), torch.randn(3, 20, rank, generator=g)),
    })


def delta(w: LoraWeights, path: str) -> torch.Tensor:
    a, b = w.pairs[path]
    return w.spec.scale * (b.double() @ a.double())


def test_exact_combination_is_the_weighted_delta():
    a, b = adapter(1), adapter(2, alpha=4.0, rslora=True)  # other scalings combine too
    got = combine([a, b], [0.3, -0.7])
    assert got.spec.rank == 8 and got.spec.scale == 1.0
    for path in a.pairs:
        want = 0.3 * delta(a, path) - 0.7 * delta(b, path)
        torch.testing.assert_close(delta(got, path), want, rtol=1e-5, atol=1e-4)


def test_one_zero_keeps_the_first_adapter():
    a, b = adapter(1), adapter(2)
    got = interpolate([a, b], [1.0, 0.0]).weights
    for path in a.pairs:
        torch.testing.assert_close(delta(got, path), delta(a, path), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_reprojection_is_the_best_rank_k_and_reports_its_error(rank):
    a, b = adapter(1), adapter(2)
    out = interpolate([a, b], [0.5, 0.5], target_rank=rank)
    assert out.weights.spec.rank == rank
    for path in a.pairs:
        exact = 0.5 * delta(a, path) + 0.5 * delta(b, path)
        dropped = torch.linalg.svdvals(exact)[..., rank:]
        bound = dropped.pow(2).sum().sqrt().item()  # Eckart-Young: no rank-k does better
        err = (exact - delta(out.weights, path)).norm().item()
        assert err == pytest.approx(bound, rel=1e-4, abs=1e-6)
        assert out.errors[path] == pytest.approx(bound, rel=1e-6, abs=1e-9)
    assert out.max_error == max(out.errors.values())


def test_reprojection_to_full_rank_is_exact_and_may_start_over_the_limit():
    a, b = adapter(1), adapter(2)
    out = interpolate([a, b], [0.5, 0.5], target_rank=8)
    assert out.max_error < 1e-6
    big = [adapter(i, rank=MAX_RANK // 2 + 1) for i in range(2)]
    with pytest.raises(IncompatibleAdapter, match="target_rank"):
        combine(big, [0.5, 0.5])
    assert interpolate(big, [0.5, 0.5], target_rank=4).weights.spec.rank == 4


def test_mismatches_are_refused():
    a = adapter(1)
    with pytest.raises(IncompatibleAdapter, match="rank"):
        combine([a, adapter(2, rank=2)], [0.5, 0.5])
    other = LoraWeights(LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj",)),
                        {"model.layers.0.self_attn.q_proj": a.pairs["model.layers.0.self_attn.q_proj"]})
    with pytest.raises(IncompatibleAdapter, match="targets"):
        combine([a, other], [0.5, 0.5])
    with pytest.raises(IncompatibleAdapter, match="coefficients"):
        combine([a, adapter(2)], [1.0])
    with pytest.raises(IncompatibleAdapter, match="target_rank"):
        interpolate([a, adapter(2)], [1.0, 1.0], target_rank=0)
