"""OpenAI / vLLM sampling parameters over the real `openai` SDK against a real server (tiny-llama):
logprobs and top logprobs against a direct log_softmax of the model's logits, penalties and
logit_bias against a torch reference with every concurrent request on its own settings,
best_of, echo with prompt logprobs, min_tokens / ignore_eos / stop_token_ids, the usage chunk
of a stream, and refusals that name the parameter."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from tests.e2e.conftest import TINY

PROMPT = "The capital of France is"
IDS = {"return_tokens_as_token_ids": True}


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


def tid(piece: str) -> int:
    assert piece.startswith("token_id:"), piece
    return int(piece.removeprefix("token_id:"))


@torch.no_grad()
def raw_logprobs(base, ids: list[int]) -> torch.Tensor:
    """log_softmax of the base's next-token logits after `ids` (no cache, no batch: the reference)."""
    logits = base.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1)


def reference_greedy(base, prompt: list[int], n: int, presence=0.0, frequency=0.0, repetition=1.0,
                     bias=None, min_tokens=0, stop=(), allowed=None) -> list[int]:
    """Greedy decoding with OpenAI's penalties, vLLM's repetition penalty, a logit bias and
    an allowed set, written out per token from their definitions."""
    tokens: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = base.model(input_ids=torch.tensor([prompt + tokens])).logits[0, -1].float().clone()
        if allowed is not None:
            outside = torch.ones_like(logits, dtype=torch.bool)
            outside[allowed] = False
            logits[outside] = float("-inf")
        for t, v in (bias or {}).items():
            logits[t] += v
        if len(tokens) < min_tokens:
            for t in stop:
                logits[t] = float("-inf")
        for t in set(prompt) | set(tokens):
            if repetition != 1:
                logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
        for t in set(tokens):
            logits[t] -= frequency * tokens.count(t) + presence
        tokens.append(int(torch.argmax(logits)))
        if tokens[-1] in stop and len(tokens) > min_tokens:
            break
    return tokens


def test_top5_logprobs_equal_a_direct_log_softmax(server, tiny_pair):
    base = tiny_pair[0]
    c = client(server)
    prompt = base.tokenizer.encode(PROMPT)
    r = c.completions.create(model=TINY, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=5,
                             extra_body={**IDS, "ignore_eos": True})
    lp = r.choices[0].logprobs
    tokens = [tid(t) for t in lp.tokens]
    assert len(tokens) == 6 and r.usage.completion_tokens == 6
    for j, tok in enumerate(tokens):
        want = raw_logprobs(base, prompt + tokens[:j])
        top = torch.topk(want, 5)
        got = {tid(k): v for k, v in lp.top_logprobs[j].items()}
        assert set(top.indices.tolist()) <= set(got) and len(got) in (5, 6)  # top 5 + the chosen one
        for t, v in got.items():
            assert v == pytest.approx(float(want[t]), abs=1e-4)
        assert lp.token_logprobs[j] == pytest.approx(float(want[tok]), abs=1e-4)
        assert tok == int(top.indices[0])  # greedy

    # chat: top_logprobs exactly k, streamed and not, the same numbers
    msgs = [{"role": "user", "content": "Name a colour"}]
    chat_prompt = list(base.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False))
    kw = dict(model=TINY, messages=msgs, max_tokens=5, temperature=0, logprobs=True, top_logprobs=5,
              extra_body={**IDS, "ignore_eos": True})
    whole = c.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = [x for ch in c.chat.completions.create(**kw, stream=True) if ch.choices and ch.choices[0].logprobs
                for x in ch.choices[0].logprobs.content]
    assert [x.token for x in streamed] == [x.token for x in whole] and len(whole) == 5
    ids = [tid(x.token) for x in whole]
    for j, item in enumerate(whole):
        want = raw_logprobs(base, chat_prompt + ids[:j])
        top = torch.topk(want, 5)
        assert [tid(x.token) for x in item.top_logprobs] == top.indices.tolist()
        assert [x.logprob for x in item.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert streamed[j].logprob == pytest.approx(item.logprob, abs=1e-6)


def test_penalties_and_logit_bias_per_row_match_a_torch_reference(server, tiny_pair):
    """Six concurrent requests, each on its own settings (they share decode batches): every
    one equals the reference, and the settings change the output."""
    base = tiny_pair[0]
    prompt = base.tokenizer.encode("1, 2, 3, 1, 2, 3,")
    plain = reference_greedy(base, prompt, 10)
    settings = [
        {},
        {"presence_penalty": 1.5},
        {"frequency_penalty": 2.0},
        {"repetition_penalty": 1.8},
        {"logit_bias": {plain[0]: -100.0, plain[2]: 5.0}},
        {"presence_penalty": -1.0, "frequency_penalty": 0.5, "repetition_penalty": 0.7,
         "logit_bias": {plain[1]: 3.0}},
    ]

    def one(kw: dict) -> list[int]:
        extra = {**IDS, "ignore_eos": True}
        for key in ("repetition_penalty",):
            if key in kw:
                extra[key] = kw[key]
        std = {k: v for k, v in kw.items() if k != "repetition_penalty"}
        if "logit_bias" in std:
            std["logit_bias"] = {str(k): v for k, v in std["logit_bias"].items()}
        r = client(server).completions.create(model=TINY, prompt=prompt, max_tokens=10, temperature=0,
                                              logprobs=0, extra_body=extra, **std)
        return [tid(t) for t in r.choices[0].logprobs.tokens]

    with ThreadPoolExecutor(len(settings)) as pool:
        got = list(pool.map(one, settings))
    for kw, tokens in zip(settings, got):
        want = reference_greedy(base, prompt, 10, presence=kw.get("presence_penalty", 0.0),
                                frequency=kw.get("frequency_penalty", 0.0),
                                repetition=kw.get("repetition_penalty", 1.0), bias=kw.get("logit_bias"))
        assert tokens == want, kw
    assert got[0] == plain and all(g != plain for g in got[1:]), "every setting should change this output"


def test_min_p_and_allowed_token_ids(server, tiny_pair):
    base = tiny_pair[0]
    c = client(server)
    prompt = base.tokenizer.encode(PROMPT)
    greedy = reference_greedy(base, prompt, 8)

    def tokens(**extra) -> list[int]:
        r = c.completions.create(model=TINY, prompt=prompt, max_tokens=8, temperature=1.0, seed=3, logprobs=0,
                                 extra_body={**IDS, "ignore_eos": True, **extra})
        return [tid(t) for t in r.choices[0].logprobs.tokens]

    assert tokens(min_p=1.0) == greedy  # only the most likely token survives min_p = 1
    assert tokens() != greedy  # (sampling at temperature 1 without it does not)
    allowed = [greedy[1], greedy[3], 42, 1000]
    got = tokens(allowed_token_ids=allowed)
    assert set(got) <= set(allowed)
    r = c.completions.create(model=TINY, prompt=prompt, max_tokens=8, temperature=0, logprobs=0,
                             extra_body={**IDS, "ignore_eos": True, "allowed_token_ids": allowed})
    want = reference_greedy(base, prompt, 8, allowed=allowed)
    assert [tid(t) for t in r.choices[0].logprobs.tokens] == want


def test_best_of_returns_the_highest_cumulative_logprob(server):
    c = client(server)
    kw = dict(model=TINY, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    every = c.completions.create(**kw, n=5, logprobs=0)
    sums = [sum(ch.logprobs.token_logprobs) for ch in every.choices]
    assert len(set(ch.text for ch in every.choices)) > 1
    best = c.completions.create(**kw, n=1, best_of=5, logprobs=0)
    # the same seed gives the same 5 candidates; best_of returns the most likely one
    assert best.choices[0].text == every.choices[max(range(5), key=sums.__getitem__)].text
    assert sum(best.choices[0].logprobs.token_logprobs) == pytest.approx(max(sums), abs=1e-5)
    assert best.usage.completion_tokens == 30  # every candidate's tokens were generated
    two = c.completions.create(**kw, n=2, best_of=5)
    assert [ch.text for ch in two.choices] == [every.choices[i].text for i in
                                              sorted(range(5), key=sums.__getitem__, reverse=True)[:2]]


def test_streams_carry_usage_with_include_usage(server):
    c = client(server)
    for make in (lambda **kw: c.completions.create(prompt=PROMPT, **kw),
                 lambda **kw: c.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], **kw)):
        chunks = list(make(model=TINY, max_tokens=5, temperature=0, n=2, stream=True,
                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        last = chunks[-1]
        assert last.choices == [] and last.usage.completion_tokens == 10
        assert last.usage.total_tokens == last.usage.prompt_tokens + 10 and last.usage.prompt_tokens > 0
        assert all(ch.usage is None for ch in chunks[:-1])
        plain = list(make(model=TINY, max_tokens=5, temperature=0, stream=True))
        assert all(ch.choices for ch in plain) and all(ch.usage is None for ch in plain)
        # vLLM's continuous_usage_stats: every chunk carries its choice's usage so far
        chunks = list(make(model=TINY, max_tokens=5, temperature=0, n=2, stream=True, extra_body={"ignore_eos": True},
                           stream_options={"include_usage": True, "continuous_usage_stats": True}))
        assert all(ch.usage is not None for ch in chunks) and chunks[-1].usage.completion_tokens == 10
        for i in (0, 1):
            counts = [ch.usage.completion_tokens for ch in chunks[:-1] if ch.choices[0].index == i]
            assert counts == sorted(counts) and counts[-1] == 5 and counts[0] >= 1


def test_echo_returns_the_prompt_and_its_logprobs(server, tiny_pair):
    base = tiny_pair[0]
    c = client(server)
    prompt = base.tokenizer.encode(PROMPT)
    r = c.completions.create(model=TINY, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2,
                             extra_body={**IDS, "ignore_eos": True})
    ch = r.choices[0]
    plain = c.completions.create(model=TINY, prompt=PROMPT, max_tokens=3, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert ch.text == PROMPT + plain.choices[0].text
    tokens = [tid(t) for t in ch.logprobs.tokens]
    assert tokens[: len(prompt)] == prompt and len(tokens) == len(prompt) + 3
    assert ch.logprobs.token_logprobs[0] is None and ch.logprobs.top_logprobs[0] is None
    for j in range(1, len(prompt)):
        want = raw_logprobs(base, prompt[:j])
        assert ch.logprobs.token_logprobs[j] == pytest.approx(float(want[prompt[j]]), abs=1e-4)
        top = {tid(k): v for k, v in ch.logprobs.top_logprobs[j].items()}
        assert set(torch.topk(want, 2).indices.tolist()) | {prompt[j]} == set(top)
    streamed = c.completions.create(model=TINY, prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                    stream=True, extra_body={"ignore_eos": True})
    assert "".join(x.choices[0].text for x in streamed) == ch.text
    # max_tokens 0 with echo scores the prompt alone (lm-eval's loglikelihood request)
    scored = c.completions.create(model=TINY, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, extra_body=IDS)
    only = scored.choices[0]
    assert only.text == PROMPT and [tid(t) for t in only.logprobs.tokens] == prompt
    assert only.logprobs.token_logprobs[1:] == pytest.approx(ch.logprobs.token_logprobs[1:len(prompt)], abs=1e-5)
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(prompt)


def test_min_tokens_ignore_eos_and_stop_token_ids(server, tiny_pair):
    base = tiny_pair[0]
    c = client(server)
    prompt = base.tokenizer.encode(PROMPT)
    free = reference_greedy(base, prompt, 12)
    eos = base.eos_token_id

    def tokens(**extra) -> tuple[list[int], str]:
        r = c.completions.create(model=TINY, prompt=prompt, max_tokens=12, temperature=0, logprobs=0,
                                 extra_body={**IDS, **extra})
        return [tid(t) for t in r.choices[0].logprobs.tokens], r.choices[0].finish_reason

    # stop_token_ids: the completion ends on the first of them (kept in the token list, not in the text)
    stop_at = free[3]
    got, reason = tokens(ignore_eos=True, stop_token_ids=[stop_at])
    assert got == free[: free.index(stop_at) + 1] and reason == "stop"
    text = c.completions.create(model=TINY, prompt=prompt, max_tokens=12, temperature=0,
                                extra_body={"ignore_eos": True, "stop_token_ids": [stop_at]}).choices[0].text
    assert text == base.tokenizer.decode(got[:-1], skip_special_tokens=True)
    kept = c.completions.create(model=TINY, prompt=prompt, max_tokens=12, temperature=0,
                                extra_body={"ignore_eos": True, "stop_token_ids": [stop_at],
                                            "include_stop_str_in_output": True}).choices[0].text
    assert kept == base.tokenizer.decode(got, skip_special_tokens=True)
    # min_tokens: the stop ids cannot be chosen before it (the reference masks them the same way)
    first = free.index(stop_at) + 1
    got, _ = tokens(ignore_eos=True, stop_token_ids=[stop_at], min_tokens=first + 2)
    want = reference_greedy(base, prompt, 12, min_tokens=first + 2, stop=(stop_at,))
    assert got == want and len(got) > first and stop_at not in got[: first + 2]
    # a large negative bias on every token but EOS makes EOS the greedy choice: EOS stops unless ignored
    biased = {str(t): -100.0 for t in set(free)}
    biased[str(eos)] = 100.0
    r = c.completions.create(model=TINY, prompt=prompt, max_tokens=6, temperature=0, logprobs=0,
                             logit_bias=biased, extra_body=IDS)
    assert [tid(t) for t in r.choices[0].logprobs.tokens] == [eos] and r.choices[0].finish_reason == "stop"
    r = c.completions.create(model=TINY, prompt=prompt, max_tokens=6, temperature=0, logprobs=0,
                             logit_bias=biased, extra_body={**IDS, "ignore_eos": True})
    assert [tid(t) for t in r.choices[0].logprobs.tokens] == [eos] * 6 and r.choices[0].finish_reason == "length"
    r = c.completions.create(model=TINY, prompt=prompt, max_tokens=6, temperature=0, logprobs=0,
                             logit_bias=biased, extra_body={**IDS, "min_tokens": 3})
    got = [tid(t) for t in r.choices[0].logprobs.tokens]
    assert len(got) == 4 and eos not in got[:3] and got[3] == eos
    # skip_special_tokens=False keeps special tokens in the text (with ignore_eos EOS is a plain token)
    r = c.completions.create(model=TINY, prompt=prompt, max_tokens=6, temperature=0, logit_bias=biased,
                             extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert r.choices[0].text == base.tokenizer.decode([eos] * 6, skip_special_tokens=False)


def test_unsupported_parameters_are_refused_by_name(server):
    c = client(server)
    cases = [
        (dict(suffix="x"), "suffix"),
        (dict(extra_body={"bad_words": ["x"]}), "bad_words"),
        (dict(extra_body={"use_beam_search": True}), "use_beam_search"),
        (dict(extra_body={"prompt_logprobs": 1}), "prompt_logprobs"),
        (dict(extra_body={"truncate_prompt_tokens": 3}), "truncate_prompt_tokens"),
        (dict(extra_body={"allowed_token_ids": [10**7]}), "vocabulary"),
        (dict(extra_body={"min_p": 1.5}), "min_p"),
        (dict(best_of=3, n=1, stream=True), "best_of"),
        (dict(best_of=1, n=2), "best_of"),
        (dict(echo=True, logprobs=1, stream=True), "echo"),
        (dict(echo=True, max_tokens=0, stream=True), "max_tokens"),
        (dict(logprobs=21), "logprobs"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(extra_body={"repetition_penalty": 0.0}), "repetition_penalty"),
        (dict(logit_bias={"abc": 1.0}), "logit_bias"),
        (dict(logit_bias={"10000000": 1.0}), "vocabulary"),
        (dict(extra_body={"stop_token_ids": [10**7]}), "vocabulary"),
        (dict(extra_body={"min_tokens": 50}), "min_tokens"),
    ]
    for kw, name in cases:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=TINY, prompt="Hi", **{"max_tokens": 4, **kw})
        assert name in e.value.message, (kw, e.value.message)
    msgs = [{"role": "user", "content": "Hi"}]
    for kw, name in [(dict(top_logprobs=2), "top_logprobs"), (dict(logprobs=True, top_logprobs=25), "top_logprobs"),
                     (dict(extra_body={"echo": True}), "echo"), (dict(tools=[{"type": "function", "function":
                                                                              {"name": "f"}}]), "tools"),
                     (dict(extra_body={"chat_template": "x"}), "chat_template")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=TINY, messages=msgs, max_tokens=4, **kw)
        assert name in e.value.message, (kw, e.value.message)
