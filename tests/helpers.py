"""Test helpers (not fixtures): adapters with non-zero updates, PEFT models on a base."""

from __future__ import annotations

import torch

from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.weights import LoraWeights
from lorafleet.model.registry import BaseInfo


def random_adapter(info: BaseInfo, spec: LoraSpec, seed: int, b_scale: float = 0.05) -> LoraWeights:
    """PEFT init for A plus a random B, so the adapter really changes the outputs."""
    w = LoraWeights.init(info, spec, seed)
    g = torch.Generator().manual_seed(seed + 10_000)
    return LoraWeights(spec, {p: (a, torch.randn(b.shape, generator=g) * b_scale) for p, (a, b) in w.pairs.items()})


def fresh_hf_model(name: str, paths):
    """An un-injected copy of a base model (PEFT wraps its own)."""
    from lorafleet.model import load_base

    return load_base(name, paths).model


def random_datum(seed: int, n: int, loss: str = "cross_entropy"):
    """N random tokens with the inputs `loss` needs (cross_entropy weights real-valued, some < 0)."""
    from lorafleet.train.types import Datum

    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(3, 1000, (n + 1,), generator=g)
    inputs = {"target_tokens": toks[1:]}
    if loss == "cross_entropy":
        inputs["weights"] = torch.rand(n, generator=g) - 0.2
    else:
        inputs["logprobs"] = -torch.rand(n, generator=g) * 5
        inputs["advantages"] = torch.randn(n, generator=g)
    return Datum(toks[:-1], inputs)


def grads(engine, handle: int) -> list[torch.Tensor]:
    """The adapter's accumulated gradients (zeros where none)."""
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in engine._live(handle).params]


def assert_fused_equals_separate(engine, handles, reqs, rtol: float, atol: float):
    """Run `reqs` fused, then each alone: every adapter's gradient, loss and logprobs must agree.

    Returns the fused results and gradients; leaves no gradient behind.
    """
    import pytest

    fused = engine.forward_backward(reqs)
    fused_grads = [grads(engine, h) for h in handles]
    for h in handles:
        engine.discard_grads(h)
    for i, (h, req) in enumerate(zip(handles, reqs)):
        (alone,) = engine.forward_backward([req])
        for g_fused, g_alone in zip(fused_grads[i], grads(engine, h)):
            torch.testing.assert_close(g_fused, g_alone, rtol=rtol, atol=atol)
        assert alone.metrics["loss:sum"] == pytest.approx(fused[i].metrics["loss:sum"], rel=1e-5, abs=1e-5)
        for o_f, o_a in zip(fused[i].outputs, alone.outputs):
            torch.testing.assert_close(o_f["logprobs"], o_a["logprobs"], rtol=1e-4, atol=1e-4)
        engine.discard_grads(h)
    return fused, fused_grads


# the devices present: tests that must hold on every device are parametrized over these
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tinker_rows(svc, name: str, **where) -> list[dict]:
    """The rows of one Tinker table (`tinker_<name>`, catalog/tinker_tables.py) matching `where`."""
    from sqlalchemy import select

    from lorafleet.catalog import tinker_tables as tt

    table = getattr(tt, f"tinker_{name}")
    stmt = select(table).where(*(table.c[k] == v for k, v in where.items()))
    with svc.repo.db.read() as conn:
        return [dict(r._mapping) for r in conn.execute(stmt)]
