"""The console's JSON routes (api/routes/console.py) without a browser: a Tinker run's per-step
metrics as the SDK saw them, and the serving counters the serving page turns into rates."""

from __future__ import annotations

import httpx
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import TINY
from tests.e2e.test_tinker_sdk_basic import BATCH


def test_run_metrics_are_the_sdk_losses_per_step(server):
    tc = tinker.ServiceClient(base_url=server.url).create_lora_training_client(
        base_model=TINY, rank=4).result()
    losses = []
    for step in range(3):
        losses.append(tc.forward_backward(BATCH, "cross_entropy").result().metrics["loss:sum"])
        # recorded before the result was handed out: a client that has it sees it charted
        seen = httpx.get(f"{server.url}/admin/v1/runs/{tc.model_id}").json()["series"]
        assert len(seen["train/loss:sum"]) == step + 1
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    evaluated = tc.forward(BATCH, "cross_entropy").result().metrics["loss:sum"]
    r = httpx.get(f"{server.url}/admin/v1/runs/{tc.model_id}")
    assert r.status_code == 200
    series = r.json()["series"]
    assert [s for s, _ in series["train/loss:sum"]] == [0, 1, 2]  # the step each gradient went into
    assert [v for _, v in series["train/loss:sum"]] == pytest.approx(losses)
    assert series["eval/loss:sum"] == [[3, pytest.approx(evaluated)]]  # forward-only: not training
    assert httpx.get(f"{server.url}/admin/v1/runs/nope:train:0").status_code == 404


def test_serving_counters(server):
    body = httpx.get(f"{server.url}/admin/v1/serving").json()
    (engine,) = body["engines"]
    assert engine["base"] == TINY and engine["max_slots"] >= 1 and engine["load_queue"] == 0
    assert set(body["counters"]) >= {"requests", "first_tokens", "first_token_seconds", "cold_loads"}
    assert body["at"] > 0
