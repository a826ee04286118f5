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


def test_capabilities_and_training_step(service_client):
    rest = service_client.create_rest_client()
    caps = rest.get_server_capabilities().result() if hasattr(rest.get_server_capabilities(), "result") else rest.get_server_capabilities()
    assert TINY in [m.model_name for m in caps.supported_models]

    tc = service_client.create_lora_training_client(base_model=TINY, rank=4)
    assert tc.model_id.endswith(":train:0")
    batch = [datum([1, 5, 9, 13, 17, 21]), datum([2, 4, 6, 8])]
    fb = tc.forward_backward(batch, "cross_entropy").result()
    assert len(fb.loss_fn_outputs) == 2
    assert fb.loss_fn_outputs[0]["logprobs"].shape == [5]
    assert "loss:sum" in fb.metrics
    opt = tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert opt is not None
    fb2 = tc.forward(batch, "cross_entropy").result()
    assert fb2.metrics["loss:sum"] < fb.metrics["loss:sum"]
