"""Several SDK clients at once: runs that are ready together are fused into one engine call,
and every run gets exactly the results it gets when it trains alone."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import tinker
from tinker import types

from tests.e2e.conftest import TINY
from tests.e2e.test_tinker_sdk_basic import datum


def one_run(url: str, k: int) -> list[float]:
    tc = tinker.ServiceClient(base_url=url).create_lora_training_client(
        base_model=TINY, rank=4, seed=k).result()
    batch = [datum([1 + k, 5 + k, 9 + k, 13 + k, 17 + k]) for _ in range(2)]
    losses = []
    for _ in range(3):
        fb = tc.forward_backward(batch, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=1e-2))
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
    sc = tc.save_weights_and_get_sampling_client().result()
    out = sc.sample(types.ModelInput.from_ints([1 + k, 5 + k]), 2,
                    types.SamplingParams(max_tokens=3, seed=k)).result()
    return losses + [float(t) for s in out.sequences for t in s.tokens]


def test_concurrent_runs_are_fused_and_match_solo_runs(server, monkeypatch):
    alone = [one_run(server.url, k) for k in range(4)]
    runner = server.service.runners[TINY]
    slow = runner.engine.forward_backward

    def forward_backward(reqs):  # a slower engine, so that concurrent requests pile up
        time.sleep(0.1)
        return slow(reqs)

    monkeypatch.setattr(runner.engine, "forward_backward", forward_backward)
    runner.stats["max_fused_models"] = 0
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda k: one_run(server.url, k), range(4)))
    assert runner.stats["max_fused_models"] >= 2
    for got, want in zip(together, alone):
        assert got == pytest.approx(want, rel=1e-4)
