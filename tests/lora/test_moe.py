"""MoE LoRA math and layers: the fast path equals the per-token reference, per-row adapters."""

import pytest
import torch

from lorafleet.engine.batch import row_operands
from lorafleet.lora.moe import lora_by_slot, moe_block_reference, route
from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.weights import LoraWeights
from tests.helpers import random_adapter

SPECS = [
    LoraSpec(rank=4, alpha=8, target_modules=("gate_proj", "up_proj", "down_proj", "gate")),
    LoraSpec(rank=2, alpha=16, target_modules=("up_proj", "q_proj")),
    LoraSpec(rank=8, alpha=8, target_modules=("down_proj", "gate"), use_rslora=True),
]


@pytest.fixture(scope="module")
def moe(paths):
    from lorafleet.engine import Engine
    from lorafleet.model import load_base

    return Engine(load_base("lorafleet/tiny-moe", paths))


def _layer_tables(w: LoraWeights | None, layer: int) -> dict | None:
    if w is None:
        return None
    out = {}
    for path, pair in w.pairs.items():
        if path.startswith(f"model.layers.{layer}.mlp."):
            out[path.rsplit(".", 1)[1]] = pair
    return out


def test_lora_by_slot_equals_a_loop():
    g = torch.Generator().manual_seed(0)
    x, a, b = torch.randn(7, 5, generator=g), torch.randn(3, 2, 5, generator=g), torch.randn(3, 4, 2, generator=g)
    slot = torch.tensor([0, 2, -1, 1, 1, 0, 2])
    want = torch.stack([torch.zeros(4) if s < 0 else b[s] @ (a[s] @ x[n]) for n, s in enumerate(slot.tolist())])
    torch.testing.assert_close(lora_by_slot(x, a, b, slot), want)


def test_route_replays_given_experts_and_renormalises():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 5.0]])
    w, e = route(logits, 2, True)
    assert e.tolist() == [[0, 1], [3, 1]]
    w2, e2 = route(logits, 2, True, replay_Nk=torch.tensor([[2, 3], [-1, -1]]))
    assert e2.tolist() == [[2, 3], [3, 1]]
    p = torch.softmax(logits[0], -1)
    torch.testing.assert_close(w2[0], torch.stack([p[2], p[3]]) / (p[2] + p[3]))
    torch.testing.assert_close(w2[1], w[1])


@pytest.mark.parametrize("replay", [False, True])
def test_moe_block_with_mixed_adapters_equals_reference(moe, replay):
    info = moe.info
    slots = [random_adapter(info, s, seed=i, b_scale=0.3) for i, s in enumerate(SPECS)] + [None]
    scales = [s.spec.scale if s is not None else 0.0 for s in slots]
    slot_B = torch.tensor([0, 3, 1, 2, 0])  # two rows share adapter 0; one row is the base alone
    g = torch.Generator().manual_seed(1)
    x_BTH = torch.randn(5, 6, 128, generator=g) * 4
    layer = 2
    block = moe.base.model.model.layers[layer].mlp
    replay_Nk = None
    if replay:
        replay_Nk = torch.randint(0, info.num_experts, (30, 2), generator=g)
        replay_Nk[::3] = -1  # some tokens route normally
        replay_Nk[:, 1] = torch.where(replay_Nk[:, 1] == replay_Nk[:, 0], (replay_Nk[:, 0] + 1) % 16, replay_Nk[:, 1])
    ops = row_operands(slots, slot_B, torch.float32)
    record: dict = {}
    replay_map = {f"model.layers.{layer}.mlp.gate": replay_Nk} if replay else None
    with torch.no_grad(), moe.runtime.use(ops), moe.runtime.routes(replay=replay_map, record=record):
        fast = block(x_BTH)
    base_experts = block.experts.base
    want, used = moe_block_reference(
        x_BTH.view(-1, 128), slot_B.repeat_interleave(6).tolist(), block.gate.weight,
        base_experts.gate_up_proj, base_experts.down_proj, base_experts.act_fn, 2, True,
        [_layer_tables(w, layer) for w in slots], scales, replay_Nk,
    )
    assert torch.equal(record[f"model.layers.{layer}.mlp.gate"].sort(-1).values, used.sort(-1).values)
    torch.testing.assert_close(fast.view(-1, 128), want, rtol=1e-4, atol=1e-5)
    # the adapters matter: rows 0 and 4 (same adapter, same input) agree; the base row differs
    with torch.no_grad(), moe.runtime.routes(replay=replay_map):
        plain = block(x_BTH)
    assert (fast[1] - plain[1]).abs().max() < 1e-5 and (fast[0] - plain[0]).abs().max() > 1e-3


def test_moe_block_gradients_equal_reference(moe):
    info = moe.info
    leaves = [random_adapter(info, s, seed=10 + i, b_scale=0.3) for i, s in enumerate(SPECS[:2])]
    for w in leaves:
        for a, b in w.pairs.values():
            a.requires_grad_(True)
            b.requires_grad_(True)
    slot_B = torch.tensor([1, 0, 1])
    x_BTH = torch.randn(3, 4, 128, generator=torch.Generator().manual_seed(2)) * 4
    block = moe.base.model.model.layers[0].mlp
    with moe.runtime.use(row_operands(leaves, slot_B, torch.float32)):
        fast = block(x_BTH).view(-1, 128)
    ex = block.experts.base
    ref, _ = moe_block_reference(
        x_BTH.view(-1, 128), slot_B.repeat_interleave(4).tolist(), block.gate.weight, ex.gate_up_proj,
        ex.down_proj, ex.act_fn, 2, True, [_layer_tables(w, 0) for w in leaves], [w.spec.scale for w in leaves],
    )
    probe = torch.randn(fast.shape, generator=torch.Generator().manual_seed(3))
    params = [t for w in leaves for p, pair in w.pairs.items() if p.startswith("model.layers.0.mlp") for t in pair]
    g_fast = torch.autograd.grad((fast * probe).sum(), params)
    g_ref = torch.autograd.grad((ref * probe).sum(), params)
    for gf, gr in zip(g_fast, g_ref):
        torch.testing.assert_close(gf, gr, rtol=1e-3, atol=1e-4 * float(gr.abs().max()))
    assert any(g.abs().max() > 0 for g in g_fast)
