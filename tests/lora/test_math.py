import pytest
import torch

from lorafleet.lora.math import apply_lora, apply_lora_reference, gather_rows, stack_table


def _pairs(ranks, k=12, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [None if r is None else (torch.randn(r, k, generator=g), torch.randn(d, r, generator=g)) for r in ranks]


@pytest.mark.parametrize("ranks", [[4], [1, 8, 3], [2, None, 5]])
def test_batched_apply_matches_per_row_loop(ranks):
    pairs = _pairs(ranks)
    scales = [0.5 + i for i in range(len(ranks))]
    slot_B = torch.tensor([0, len(ranks) - 1, 0, len(ranks) - 1, len(ranks) // 2])
    x = torch.randn(5, 7, 12)
    y = torch.randn(5, 7, 10)
    a, b = stack_table(pairs, scales, torch.float32)
    got = apply_lora(y, x, *gather_rows(a, b, slot_B))
    want = apply_lora_reference(y, x, pairs, scales, slot_B.tolist())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_padding_to_the_largest_rank_gets_zero_gradient():
    a1, b1 = torch.randn(2, 6, requires_grad=True), torch.randn(4, 2, requires_grad=True)
    a2, b2 = torch.randn(5, 6, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    a, b = stack_table([(a1, b1), (a2, b2)], [1.0, 1.0], torch.float32)
    assert a.shape == (2, 5, 6) and b.shape == (2, 4, 5)
    x = torch.randn(3, 2, 6)
    out = apply_lora(torch.zeros(3, 2, 4), x, *gather_rows(a, b, torch.tensor([0, 0, 1])))
    out.sum().backward()
    # rank-2 adapter alone gives the same gradient as inside the padded table
    a1s, b1s = a1.detach().clone().requires_grad_(), b1.detach().clone().requires_grad_()
    ((x[:2] @ a1s.T) @ b1s.T).sum().backward()
    torch.testing.assert_close(a1.grad, a1s.grad)
    torch.testing.assert_close(b1.grad, b1s.grad)
