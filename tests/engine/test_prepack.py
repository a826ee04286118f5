"""CPU weight prepacking: same numbers as nn.Linear, same parameters, ties and state_dict;
engines with and without it sample the same tokens."""

import copy
import pickle

import pytest
import torch
from torch import nn

from lorafleet.engine import Engine, SampleRequest, SamplingParams
from lorafleet.engine.prepack import MIN_ROWS, PrepackedLinear, prepack, supported
from lorafleet.lora.spec import LoraSpec
from lorafleet.model import load_base
from tests.helpers import random_adapter

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 24), (MIN_ROWS, 24), (3, 7, 24)])
def test_outputs_equal_linear_with_and_without_autograd(bias, shape):
    torch.manual_seed(0)
    plain = nn.Linear(24, 40, bias=bias)
    packed = PrepackedLinear(plain)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), plain(x), rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    packed(xg).square().sum().backward()
    xr = x.clone().requires_grad_(True)
    plain(xr).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)


def test_batched_inference_takes_the_packed_weight():
    plain = nn.Linear(24, 40)
    packed = PrepackedLinear(plain)
    with torch.no_grad():
        plain.weight.zero_()  # the plain weight changes; the packed copy was taken before
        out = packed(torch.ones(MIN_ROWS, 24))
        one = packed(torch.ones(1, 24))  # one row: torch's own kernel, the plain weight
    assert out.sub(plain.bias).abs().max() > 0
    torch.testing.assert_close(one, plain.bias[None])


def test_prepack_swaps_linears_in_place_and_keeps_ties_and_state(paths):
    base = load_base("HuggingFaceTB/SmolLM2-135M-Instruct", paths)  # tied embeddings
    model = base.model
    keys = list(model.state_dict())
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert prepack(model) == linears > 0
    assert prepack(model) == 0  # idempotent
    assert all(type(m) is not nn.Linear for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert list(model.state_dict()) == keys
    twin = copy.deepcopy(model.model.layers[0].mlp)  # the packed copy is rebuilt, not copied
    x = torch.randn(2, 3, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model.model.layers[0].mlp(x))
    assert isinstance(pickle.loads(pickle.dumps(model.model.layers[0].mlp.up_proj)), PrepackedLinear)


def test_bf16_and_switched_off_engines_are_left_alone(paths):
    bf16 = load_base("lorafleet/tiny-llama", paths, dtype="bf16")
    assert not supported(bf16.model) and prepack(bf16.model) == 0
    off = Engine(load_base("lorafleet/tiny-llama", paths), cpu_prepack=False)
    assert not any(isinstance(m, PrepackedLinear) for m in off.base.model.modules())


def test_engines_with_and_without_prepacking_sample_alike(paths):
    engines = [Engine(load_base("lorafleet/tiny-llama", paths), cpu_prepack=on) for on in (False, True)]
    assert any(isinstance(m, PrepackedLinear) for m in engines[1].base.model.modules())
    spec = LoraSpec(rank=4, alpha=32)
    results = []
    for engine in engines:
        handles = [engine.create_adapter(spec, weights=random_adapter(engine.info, spec, seed=i, b_scale=0.5))
                   for i in range(5)]
        reqs = [SampleRequest(h, [1, 504, 2823, 314, 4544][: 2 + i], 1, SamplingParams(max_tokens=8, temperature=0))
                for i, h in enumerate(handles)]
        results.append(engine.sample(reqs))
    for plain, packed in zip(*results):
        assert plain.sequences[0].tokens == packed.sequences[0].tokens
        torch.testing.assert_close(torch.tensor(packed.sequences[0].logprobs), torch.tensor(plain.sequences[0].logprobs),
                                   rtol=0, atol=1e-4)
