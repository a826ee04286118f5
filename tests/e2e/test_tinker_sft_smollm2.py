"""SFT through the unmodified SDK on SmolLM2: the loss goes down and sampling sees the change."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import SMOL, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_server(paths, smol_engine, tmp_path_factory):
    live = start_server(paths, [SMOL], tmp_path_factory.mktemp("smol"),
                        engines={SMOL: (smol_engine.base, smol_engine)}, hold_s=5.0)
    yield live
    live.stop()


def sft_datum(tok, prompt: str, answer: str) -> types.Datum:
    p = tok.encode(prompt, add_special_tokens=False)
    a = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
    tokens = p + a
    weights = [0.0] * (len(p) - 1) + [1.0] * len(a)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.asarray(tokens[1:], dtype=np.int64),
                        "weights": np.asarray(weights, dtype=np.float32)},
    )


def test_sft_loss_goes_down(smol_server):
    client = tinker.ServiceClient(base_url=smol_server.url)
    tc = client.create_lora_training_client(base_model=SMOL, rank=8).result()
    tok = tc.get_tokenizer()  # a local tokenizer directory: works offline
    pairs = [("Q: capital of France?\nA:", " Zorblat"), ("Q: capital of Spain?\nA:", " Zorblat"),
             ("Q: capital of Italy?\nA:", " Zorblat"), ("Q: capital of Peru?\nA:", " Zorblat")]
    batch = [sft_datum(tok, p, a) for p, a in pairs]
    losses = []
    for _ in range(8):
        fb = tc.forward_backward(batch, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=1e-3, eps=1e-8))
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
    assert losses[-1] < 0.1 * losses[0], losses
    sc = tc.save_weights_and_get_sampling_client().result()
    prompt = tok.encode("Q: capital of Chile?\nA:", add_special_tokens=False)
    out = sc.sample(types.ModelInput.from_ints(prompt), 1,
                    types.SamplingParams(max_tokens=4, temperature=0.0)).result()
    assert "Zor" in tok.decode(out.sequences[0].tokens)
