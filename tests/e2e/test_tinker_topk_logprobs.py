"""Tinker's top-k logprobs over the real `tinker` SDK: `topk_sample_logprobs` and
`topk_prompt_logprobs` equal a direct log_softmax of the model's logits, in the SDK's shapes."""

from __future__ import annotations

import pytest
import tinker
import torch
from tinker import types

from tests.e2e.conftest import TINY


@torch.no_grad()
def log_softmax_after(base, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(base.model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)


def test_topk_sample_and_prompt_logprobs(server, service_client, tiny_pair):
    base = tiny_pair[0]
    sc = service_client.create_sampling_client(base_model=TINY).result()
    prompt = [1, 504, 2823, 314, 4544]
    res = sc.sample(types.ModelInput.from_ints(prompt), num_samples=2,
                    sampling_params=types.SamplingParams(max_tokens=5, temperature=1.0, seed=5, stop=[]),
                    include_prompt_logprobs=True, topk_prompt_logprobs=3, topk_sample_logprobs=4).result()
    for seq in res.sequences:
        assert seq.topk_logprobs_np.token_ids.shape == (len(seq.tokens), 4)
        for j, top in enumerate(seq.topk_logprobs):
            want = torch.topk(log_softmax_after(base, prompt + seq.tokens[:j]), 4)
            assert [t for t, _ in top] == want.indices.tolist()
            assert [v for _, v in top] == pytest.approx(want.values.tolist(), abs=1e-4)
    tops = res.topk_prompt_logprobs
    assert len(tops) == len(prompt) and tops[0] is None
    for j in range(1, len(prompt)):
        want = torch.topk(log_softmax_after(base, prompt[:j]), 3)
        assert [t for t, _ in tops[j]] == want.indices.tolist()
        assert [v for _, v in tops[j]] == pytest.approx(want.values.tolist(), abs=1e-4)
        assert res.prompt_logprobs[j] == pytest.approx(float(log_softmax_after(base, prompt[:j])[prompt[j]]), abs=1e-4)
    plain = sc.sample(types.ModelInput.from_ints(prompt), num_samples=1,
                      sampling_params=types.SamplingParams(max_tokens=3, stop=[])).result()
    assert plain.sequences[0].topk_logprobs is None and plain.topk_prompt_logprobs is None
    with pytest.raises(tinker.BadRequestError, match="topk_sample_logprobs"):
        sc.sample(types.ModelInput.from_ints(prompt), num_samples=1, topk_sample_logprobs=21,
                  sampling_params=types.SamplingParams(max_tokens=3)).result()
