"""Iteration-level batching over the real OpenAI SDK: a short request sent while a long
streamed one decodes is answered at once (it joins the running batch), and a client that
closes its stream frees its rows at the engine's next step."""

from __future__ import annotations

import time

import openai

from tests.e2e.conftest import TINY


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


def wait_rows_freed(runner, deadline_s: float = 20.0) -> None:
    deadline = time.monotonic() + deadline_s
    while runner.decode.rows or runner.decode.prefills:
        assert time.monotonic() < deadline, "the closed stream's rows never left the batch"
        time.sleep(0.02)


def test_a_short_completion_finishes_while_a_long_stream_decodes(server):
    c = client(server)
    t0 = time.monotonic()
    c.completions.create(model=TINY, prompt="Hello there", max_tokens=4, temperature=0)
    unloaded_s = time.monotonic() - t0
    stream = c.completions.create(model=TINY, prompt="Tell me a long story", max_tokens=1500,
                                  temperature=0, stream=True)
    chunks = iter(stream)
    for _ in range(3):  # the long completion is decoding
        assert next(chunks).choices[0].finish_reason is None
    t0 = time.monotonic()
    short = c.completions.create(model=TINY, prompt="Hello there", max_tokens=4, temperature=0)
    loaded_s = time.monotonic() - t0
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 4
    assert next(chunks).choices[0].finish_reason is None  # the long one is still going
    # generous: the old whole-batch scheduler took the long one's full decode (~250x)
    assert loaded_s < max(5.0, 20 * unloaded_s), (loaded_s, unloaded_s)
    stream.close()
    wait_rows_freed(server.service.runners[TINY])


def test_a_closed_stream_frees_its_rows_and_the_engine_keeps_serving(server):
    c = client(server)
    runner = server.service.runners[TINY]
    stream = c.completions.create(model=TINY, prompt="Once upon a time", max_tokens=1500, n=3,
                                  temperature=1.0, stream=True)
    chunks = iter(stream)
    for _ in range(4):  # past the first token of each choice: a decode step has run
        next(chunks)
    assert len(runner.decode.rows) == 3
    stream.close()
    wait_rows_freed(runner)
    again = c.completions.create(model=TINY, prompt="Once upon a time", max_tokens=3)
    assert again.usage.completion_tokens <= 3 and runner.alive
