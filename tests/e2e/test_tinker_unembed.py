"""`train_unembed=True` (the SDK's and the cookbook's default) puts a LoRA on the LM head:
trained, exported as standard PEFT (`lm_head` in target_modules) that real PEFT loads with
equal logits, resumed from a checkpoint, and served by the sampler."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import tinker
import torch
from safetensors.torch import load_file, save_file
from tinker import types

from tests.e2e.conftest import TINY
from tests.e2e.test_tinker_sdk_basic import BATCH, datum

ADAM = types.AdamParams(learning_rate=2e-2, eps=1e-8)
PROMPT = [1, 5, 9, 13, 17, 21]
HEAD_B = "base_model.model.lm_head.lora_B.weight"


def _export(server, tc, name, folder):
    path = tc.save_weights_external(name).result().path
    urls = tinker.RestClient(base_url=server.url).get_external_weights_urls(path).result()
    folder.mkdir()
    for file, url in urls.urls.items():
        with urllib.request.urlopen(url) as resp:
            (folder / file).write_bytes(resp.read())
    return path


def _peft_logprobs(paths, folder):
    from peft import PeftModel

    from lorafleet.model import load_base

    model = PeftModel.from_pretrained(load_base(TINY, paths).model, str(folder))
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT[:-1]])).logits[0]
    return torch.log_softmax(logits.float(), -1)[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])].numpy()


def test_train_unembed_trains_exports_and_serves_the_lm_head(server, service_client, tmp_path, paths):
    tc = service_client.create_lora_training_client(base_model=TINY, rank=4).result()  # train_unembed=True
    for _ in range(3):
        tc.forward_backward(BATCH, "cross_entropy").result()
        tc.optim_step(ADAM).result()
    path = _export(server, tc, "unembed", tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert "lm_head" in config["target_modules"]
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert tensors[HEAD_B].shape == (49152, 4) and tensors[HEAD_B].abs().max() > 0  # it was trained
    assert tinker.RestClient(base_url=server.url).get_weights_info_by_tinker_path(path).result().train_unembed

    want = tc.forward([datum(PROMPT)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(_peft_logprobs(paths, tmp_path / "a"), want, atol=1e-4)
    # the head's LoRA matters: without it PEFT gives other logprobs
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "adapter_config.json").write_text(json.dumps(config))
    save_file(dict(tensors, **{HEAD_B: torch.zeros_like(tensors[HEAD_B])}), str(tmp_path / "c" / "adapter_model.safetensors"))
    assert np.abs(_peft_logprobs(paths, tmp_path / "c") - want).max() > 1e-4

    sampled = tc.save_weights_and_get_sampling_client().result().sample(
        types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=1),
        include_prompt_logprobs=True).result()
    np.testing.assert_allclose(sampled.prompt_logprobs[1:], want, atol=1e-4)

    state = tc.save_state("with-head").result().path
    resumed = service_client.create_training_client_from_state(state).result()
    again = resumed.forward([datum(PROMPT)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(again, want, atol=1e-6)


def test_train_unembed_false_leaves_the_lm_head_alone(server, service_client, tmp_path):
    tc = service_client.create_lora_training_client(base_model=TINY, rank=2, train_unembed=False).result()
    path = _export(server, tc, "no-head", tmp_path / "b")
    assert "lm_head" not in json.loads((tmp_path / "b" / "adapter_config.json").read_text())["target_modules"]
    assert not tinker.RestClient(base_url=server.url).get_weights_info_by_tinker_path(path).result().train_unembed
