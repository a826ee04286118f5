"""Mixed-adapter sampling: logprobs agree with forward, seeds, stops, n samples, bad input."""

import pytest
import torch

from lorafleet.engine import SampleRequest, SamplingParams
from lorafleet.errors import BadTokens, InvalidRequest, NotFound
from lorafleet.lora.spec import LoraSpec
from lorafleet.train.types import Datum, FwdBwdRequest
from tests.helpers import random_adapter

PROMPT = [1, 504, 2823, 314, 4544]


@pytest.fixture()
def two_adapters(tiny_engine):
    specs = [LoraSpec(rank=4, alpha=32), LoraSpec(rank=8, alpha=64, target_modules=("q_proj", "v_proj", "up_proj"))]
    return [tiny_engine.create_adapter(s, weights=random_adapter(tiny_engine.info, s, seed=i, b_scale=0.5)) for i, s in enumerate(specs)]


def _forward_logprobs(engine, handle, prompt, completion):
    seq = torch.tensor(prompt + completion)
    datum = Datum(seq[:-1], {"target_tokens": seq[1:]})
    if handle is None:  # the base alone: a rank-1 adapter with B = 0 adds nothing
        handle = engine.create_adapter(LoraSpec(rank=1), seed=0)
    (res,) = engine.forward_backward([FwdBwdRequest(handle, [datum], forward_only=True)])
    return res.outputs[0]["logprobs"][len(prompt) - 1:]


def test_sampled_logprobs_equal_forward_logprobs_in_a_mixed_batch(tiny_engine, two_adapters):
    a, b = two_adapters
    reqs = [
        SampleRequest(a, PROMPT, 2, SamplingParams(max_tokens=8, seed=1)),
        SampleRequest(None, PROMPT[:3], 1, SamplingParams(max_tokens=6, temperature=0.7, seed=2)),
        SampleRequest(b, PROMPT[1:], 1, SamplingParams(max_tokens=8, temperature=0, stop_token_ids=())),
    ]
    results = tiny_engine.sample(reqs)
    for req, res in zip(reqs, results):
        assert len(res.sequences) == req.num_samples
        for seq in res.sequences:
            want = _forward_logprobs(tiny_engine, req.adapter, req.prompt, seq.tokens)
            torch.testing.assert_close(torch.tensor(seq.logprobs), want, rtol=1e-4, atol=1e-4)


def test_rows_in_a_mixed_batch_equal_rows_alone(tiny_engine, two_adapters):
    a, b = two_adapters
    p = SamplingParams(max_tokens=6, temperature=0, stop_token_ids=())
    reqs = [SampleRequest(a, PROMPT, 1, p), SampleRequest(b, PROMPT[:2], 1, p), SampleRequest(None, PROMPT, 1, p)]
    together = tiny_engine.sample(reqs)
    for req, res in zip(reqs, together):
        (alone,) = tiny_engine.sample([req])
        assert alone.sequences[0].tokens == res.sequences[0].tokens
    assert together[0].sequences[0].tokens != together[2].sequences[0].tokens  # the adapter matters


def test_same_seed_same_tokens_and_samples_differ(tiny_engine, two_adapters):
    req = SampleRequest(two_adapters[0], PROMPT, 3, SamplingParams(max_tokens=10, seed=42, stop_token_ids=()))
    first, second = tiny_engine.sample([req])[0], tiny_engine.sample([req])[0]
    assert [s.tokens for s in first.sequences] == [s.tokens for s in second.sequences]
    assert len({tuple(s.tokens) for s in first.sequences}) == 3
    other = tiny_engine.sample([SampleRequest(two_adapters[0], PROMPT, 1, SamplingParams(max_tokens=10, seed=43, stop_token_ids=()))])[0]
    assert other.sequences[0].tokens != first.sequences[0].tokens


def test_stop_token_ids_and_length(tiny_engine):
    greedy = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=())
    (res,) = tiny_engine.sample([SampleRequest(None, PROMPT, 1, greedy)])
    toks = res.sequences[0].tokens
    assert len(toks) == 12 and res.sequences[0].stop_reason == "length"
    stop_at = toks[4]
    (res2,) = tiny_engine.sample([SampleRequest(None, PROMPT, 1, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop_at,)))])
    seq = res2.sequences[0]
    assert seq.stop_reason == "stop" and seq.tokens == toks[: toks.index(stop_at) + 1]


def test_on_token_returning_true_stops_that_row_alone(tiny_engine):
    """A streaming client that went away stops its rows at once; the other rows run on."""
    greedy = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=())
    reqs = [SampleRequest(None, PROMPT, 2, greedy), SampleRequest(None, PROMPT[:3], 1, greedy)]
    alone = tiny_engine.sample(reqs)
    res = tiny_engine.sample(reqs, on_token=lambda req, k, tok, lp: req == 0 and k == 1)
    stopped = res[0].sequences[1]
    assert stopped.stop_reason == "abort" and stopped.tokens == alone[0].sequences[1].tokens[:1]
    assert res[0].sequences[0].tokens == alone[0].sequences[0].tokens
    assert res[1].sequences[0].tokens == alone[1].sequences[0].tokens


def test_stop_strings(smol_engine):
    tok = smol_engine.base.tokenizer
    prompt = tok.encode("Count: one, two, three,")
    greedy = SamplingParams(max_tokens=24, temperature=0)
    (free,) = smol_engine.sample([SampleRequest(None, prompt, 1, greedy)])
    text = tok.decode(free.sequences[0].tokens)
    stop = text.strip()[:4]
    assert stop
    (stopped,) = smol_engine.sample([SampleRequest(None, prompt, 1, SamplingParams(max_tokens=24, temperature=0, stop_strings=(stop,)))])
    seq = stopped.sequences[0]
    assert seq.stop_reason == "stop"
    assert stop in tok.decode(seq.tokens) and stop not in tok.decode(seq.tokens[:-1])


def test_greedy_smollm2_matches_transformers_generate(smol_engine, paths):
    from tests.helpers import fresh_hf_model

    tok = smol_engine.base.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    (res,) = smol_engine.sample([SampleRequest(None, prompt, 1, SamplingParams(max_tokens=12, temperature=0))])
    hf = fresh_hf_model("HuggingFaceTB/SmolLM2-135M-Instruct", paths)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    want = out[0, len(prompt):].tolist()
    assert res.sequences[0].tokens == want[: len(res.sequences[0].tokens)]
    assert "Paris" in tok.decode(res.sequences[0].tokens)


def test_prompt_logprobs_equal_forward(tiny_engine, two_adapters):
    a = two_adapters[0]
    (res,) = tiny_engine.sample([SampleRequest(a, PROMPT, 1, SamplingParams(max_tokens=1), prompt_logprobs=True)])
    assert res.prompt_logprobs[0] is None
    want = _forward_logprobs(tiny_engine, a, PROMPT[:1], PROMPT[1:])
    torch.testing.assert_close(torch.tensor(res.prompt_logprobs[1:]), want, rtol=1e-4, atol=1e-4)


def test_top_k_one_is_greedy(tiny_engine, two_adapters):
    a = two_adapters[0]
    g = tiny_engine.sample([SampleRequest(a, PROMPT, 1, SamplingParams(max_tokens=6, temperature=0, stop_token_ids=()))])[0]
    k1 = tiny_engine.sample([SampleRequest(a, PROMPT, 1, SamplingParams(max_tokens=6, temperature=1.5, top_k=1, stop_token_ids=()))])[0]
    p0 = tiny_engine.sample([SampleRequest(a, PROMPT, 1, SamplingParams(max_tokens=6, temperature=1.5, top_p=1e-6, stop_token_ids=()))])[0]
    assert g.sequences[0].tokens == k1.sequences[0].tokens == p0.sequences[0].tokens


@pytest.mark.parametrize(
    "req, exc, msg",
    [
        (SampleRequest(None, [], 1), BadTokens, "empty"),
        (SampleRequest(None, [1, 10**6], 1), BadTokens, "must be in"),
        (SampleRequest(None, [-1], 1), BadTokens, "must be in"),
        (SampleRequest(None, PROMPT, 1, SamplingParams(max_tokens=0)), InvalidRequest, "max_tokens must be >= 1"),
        (SampleRequest(None, PROMPT, 0), InvalidRequest, "num_samples"),
        (SampleRequest(None, PROMPT, 1, SamplingParams(max_tokens=5000)), InvalidRequest, "context length 2048"),
        (SampleRequest(None, PROMPT, 1, SamplingParams(temperature=-1)), InvalidRequest, "temperature"),
        (SampleRequest(None, PROMPT, 1, SamplingParams(top_p=0)), InvalidRequest, "top_p"),
        (SampleRequest(77, PROMPT, 1), NotFound, "no adapter"),
    ],
)
def test_bad_sampling_input(tiny_engine, req, exc, msg):
    with pytest.raises(exc, match=msg):
        tiny_engine.sample([req])
