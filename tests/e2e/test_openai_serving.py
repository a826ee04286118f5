"""Serving many adapters over the OpenAI API, tested with the real `openai` SDK against a real
server on loopback: residency tiers with a small slot count, cold loads as scheduled work
(coalesced, bounded, 429 + Retry-After), alias-aware routing with readiness, tenancy, errors.
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from lorafleet.catalog.records import ADMIN
from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.weights import LoraWeights
from tests.e2e.conftest import TINY, start_server

N_ADAPTERS = 50
SPEC = LoraSpec(rank=1, alpha=32.0, target_modules=("q_proj", "v_proj", "down_proj"))
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,", "Hello"]


def adapter_weights(info, seed: int) -> LoraWeights:
    """A rank-1 adapter whose outputs differ from the base (PEFT init has B = 0)."""
    w = LoraWeights.init(info, SPEC, seed=seed)
    g = torch.Generator().manual_seed(10_000 + seed)
    return LoraWeights(w.spec, {p: (a * 4, torch.randn(b.shape, generator=g) * 0.5) for p, (a, b) in w.pairs.items()})


@pytest.fixture(scope="module")
def fleet(paths, tiny_pair, tmp_path_factory):
    """A server with 4 slots, 8 host adapters and a load queue of 8; alice owns 50 adapters."""
    live = start_server(paths, [TINY], tmp_path_factory.mktemp("serving"), engines={TINY: tiny_pair},
                        auth="keys", hold_s=5.0, max_slots=4, max_host_adapters=8, load_queue=8,
                        load_batch=4)
    catalog = live.app.state.catalog
    keys = {"alice": catalog.create_key("alice"), "bob": catalog.create_key("bob")}
    info = tiny_pair[0].info
    revs = {}
    for i in range(N_ADAPTERS):
        catalog.create_policy(ADMIN, f"alice/a{i}", TINY, SPEC)
        revs[i] = catalog.publish_weights(ADMIN, f"alice/a{i}", adapter_weights(info, i), aliases=["prod"]).id
    # a policy with two revisions for alias moves and rollbacks
    catalog.create_policy(ADMIN, "alice/chat", TINY, SPEC)
    v1 = catalog.publish_weights(ADMIN, "alice/chat", adapter_weights(info, 101), aliases=["prod"]).id
    v2 = catalog.publish_weights(ADMIN, "alice/chat", adapter_weights(info, 102)).id
    live.keys, live.revs, live.chat = keys, revs, (v1, v2)
    live.openai = live.app.state.openai
    live.residency = live.openai.runners[TINY].residency
    yield live
    live.stop()


def client(fleet, who: str = "alice", retries: int = 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fleet.url}/v1", api_key=fleet.keys[who], max_retries=retries, timeout=120)


def greedy(c: openai.OpenAI, model: str, prompt: str, max_tokens: int = 8) -> str:
    r = c.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0)
    return r.choices[0].text


def metric(fleet, name: str, labels: str = "") -> float:
    text = httpx.get(f"{fleet.url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(\{{[^}}]*\}})? ([0-9.e+-]+)$", line)
        if m and labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total


def test_completions_chat_streaming_stops_seeds(fleet):
    c = client(fleet)
    base = greedy(c, TINY, PROMPTS[0], 12)
    tuned = greedy(c, "alice/a0", PROMPTS[0], 12)
    assert base and tuned and base != tuned
    assert greedy(c, "alice/a0:prod", PROMPTS[0], 12) == tuned
    assert greedy(c, f"alice/a0@{fleet.revs[0]}", PROMPTS[0], 12) == tuned

    # streaming gives the same text as the non-streaming call
    chunks = list(c.completions.create(model="alice/a0", prompt=PROMPTS[0], max_tokens=12,
                                       temperature=0.0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == tuned
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")

    # chat with the base's chat template, streamed and not
    msgs = [{"role": "user", "content": "Say hi"}]
    chat = c.chat.completions.create(model="alice/a1", messages=msgs, max_tokens=10, temperature=0.0)
    stream = c.chat.completions.create(model="alice/a1", messages=msgs, max_tokens=10, temperature=0.0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream)
    assert text == chat.choices[0].message.content and chat.usage.completion_tokens >= 1

    # a stop string cuts the text and reports finish_reason 'stop'
    long = greedy(c, "alice/a0", PROMPTS[0], 16)
    stop = long.strip()[:3]
    if stop:
        r = c.completions.create(model="alice/a0", prompt=PROMPTS[0], max_tokens=16, temperature=0.0, stop=[stop])
        assert stop not in r.choices[0].text and r.choices[0].finish_reason == "stop"

    # seeds: the same seed gives the same samples; n samples, logprobs
    kw = dict(model="alice/a2", prompt=PROMPTS[1], max_tokens=8, temperature=1.0, seed=7, n=3, logprobs=1)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [x.text for x in a.choices] == [x.text for x in b.choices] and len(a.choices) == 3
    assert len(a.choices[0].logprobs.token_logprobs) == a.usage.completion_tokens // 3 or a.choices[0].logprobs


def test_models_lists_bases_and_own_adapters(fleet):
    ids = [m.id for m in client(fleet).models.list().data]
    assert TINY in ids and "alice/a0" in ids
    assert not any(i.startswith("alice/") for i in (m.id for m in client(fleet, "bob").models.list().data))


def test_100_concurrent_requests_over_50_adapters_equal_serial(fleet):
    """4 slots, 8 host adapters, a load queue of 8: every request succeeds (the SDK retries the
    429s), and each output equals the same request run alone; adapters are evicted and
    reloaded along the way with identical outputs."""
    c = client(fleet)
    jobs = [(f"alice/a{i % N_ADAPTERS}", PROMPTS[i % len(PROMPTS)]) for i in range(100)]
    serial = {job: greedy(c, *job) for job in dict.fromkeys(jobs)}
    loads0 = fleet.residency.loader.loads
    evict0 = metric(fleet, "lorafleet_residency_evictions_total", 'tier="slot"')
    with ThreadPoolExecutor(32) as pool:
        concurrent = list(pool.map(lambda job: greedy(c, *job), jobs))
    assert concurrent == [serial[job] for job in jobs]
    assert fleet.residency.loader.loads > loads0  # evicted adapters were loaded again ...
    assert metric(fleet, "lorafleet_residency_evictions_total", 'tier="slot"') > evict0
    assert fleet.residency.counts()["slot"] <= 4 and fleet.residency.counts()["host"] <= 8


def test_full_load_queue_is_a_retryable_429(fleet):
    c = client(fleet, retries=0)
    statuses = []

    def one(i: int) -> int:
        try:
            greedy(c, f"alice/a{i}", "x", 1)
            return 200
        except openai.RateLimitError as e:
            assert e.response.headers.get("retry-after")
            return 429

    with ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(one, range(10, 50)))
    assert set(statuses) <= {200, 429} and 200 in statuses
    assert statuses.count(429) > 0  # queue full, or host memory full of adapters in use
    assert metric(fleet, "lorafleet_cold_load_rejections_total") > 0


def test_full_load_queue_is_a_429_for_streams_too(fleet):
    """Admission (cold load, host hold, serving queue) comes before a stream's status line: a
    full load queue is a 429 + Retry-After, never a 200 followed by an in-stream error."""
    c = client(fleet, retries=0)

    def one(i: int) -> str:
        try:
            stream = c.completions.create(model=f"alice/a{i}", prompt="x", max_tokens=1, temperature=0.0,
                                          stream=True)
        except openai.RateLimitError as e:
            assert e.response.headers.get("retry-after")
            return "429"
        try:
            assert list(stream)[-1].choices[0].finish_reason in ("length", "stop")
        except openai.APIError as e:
            return f"in-stream error: {e}"
        return "200"

    with ThreadPoolExecutor(40) as pool:
        outcomes = list(pool.map(one, range(10, 50)))
    assert set(outcomes) <= {"200", "429"}, outcomes
    assert "200" in outcomes and "429" in outcomes


def test_identical_concurrent_misses_share_one_load(fleet):
    c = client(fleet)
    ref = "alice/a49"
    for i in range(12):  # make sure a49 is cold
        greedy(c, f"alice/a{30 + i}", "x", 1)
    assert str(fleet.residency.tier(fleet.revs[49])) == "store"
    loads0, batches0 = fleet.residency.loader.loads, fleet.residency.loader.batches
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda _: greedy(c, ref, PROMPTS[2]), range(8)))
    assert len(set(outs)) == 1
    assert fleet.residency.loader.loads - loads0 == 1 and fleet.residency.loader.batches - batches0 == 1


def test_eviction_and_reload_give_identical_outputs(fleet):
    c = client(fleet)
    first = [greedy(c, "alice/a3", p, 10) for p in PROMPTS]
    for i in range(20, 35):  # push a3 out of slots and host memory
        greedy(c, f"alice/a{i}", "x", 1)
    assert str(fleet.residency.tier(fleet.revs[3])) == "store"
    assert [greedy(c, "alice/a3", p, 10) for p in PROMPTS] == first


def test_warm_pin_unpin_over_http(fleet):
    h = {"X-API-Key": fleet.keys["alice"]}
    r = httpx.post(f"{fleet.url}/catalog/v1/warm", headers=h, json={"refs": ["alice/a40"], "tier": "host"})
    assert r.status_code == 200 and r.json()[0]["tier"] in ("host", "slot"), r.text
    r = httpx.post(f"{fleet.url}/catalog/v1/pin", headers=h, json={"ref": "alice/a41"}, timeout=60)
    assert r.json()["tier"] == "slot" and r.json()["pinned"], r.text
    c = client(fleet)
    for i in range(10):  # other traffic does not evict a pinned adapter
        greedy(c, f"alice/a{i}", "x", 1)
    assert str(fleet.residency.tier(fleet.revs[41])) == "slot"
    r = httpx.post(f"{fleet.url}/catalog/v1/unpin", headers=h, json={"ref": "alice/a41"})
    assert r.status_code == 200 and not r.json()["pinned"]
    bob = {"X-API-Key": fleet.keys["bob"]}
    assert httpx.post(f"{fleet.url}/catalog/v1/pin", headers=bob, json={"ref": "alice/a41"}).status_code == 404


def test_alias_move_under_load_and_rollback(fleet):
    c = client(fleet)
    v1, v2 = fleet.chat
    want1 = greedy(c, f"alice/chat@{v1}", PROMPTS[0])
    want2 = greedy(c, f"alice/chat@{v2}", PROMPTS[0])
    assert want1 != want2
    for i in range(12):  # v2 cold again, so the prewarm has something to do
        greedy(c, f"alice/a{i}", "x", 1)
    assert str(fleet.residency.tier(v2)) == "store"
    seen: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            seen.append(greedy(c, "alice/chat:prod", PROMPTS[0]))

    h = {"X-API-Key": fleet.keys["alice"]}
    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(traffic)
        while len(seen) < 4:
            threading.Event().wait(0.05)
        r = httpx.put(f"{fleet.url}/catalog/v1/policies/alice/chat/aliases/prod", headers=h, timeout=60,
                      json={"ref": v2, "prewarm": True})
        assert r.status_code == 200, r.text
        assert str(fleet.residency.tier(v2)) in ("slot", "host")  # ready before exposed
        loads = fleet.residency.loader.loads
        after = [greedy(c, "alice/chat:prod", PROMPTS[0]) for _ in range(3)]
        stop.set()
    assert after == [want2] * 3 and fleet.residency.loader.loads == loads  # no user hit the load
    assert set(seen) <= {want1, want2} and want1 in seen
    # rollback to the still-resident v1: immediate, no load
    assert str(fleet.residency.tier(v1)) in ("slot", "host")
    r = httpx.post(f"{fleet.url}/catalog/v1/policies/alice/chat/aliases/prod/rollback", headers=h, json={})
    assert r.status_code == 200, r.text
    loads = fleet.residency.loader.loads
    assert greedy(c, "alice/chat:prod", PROMPTS[0]) == want1 and fleet.residency.loader.loads == loads


def test_tenancy_and_bad_requests_are_4xx_with_a_message(fleet):
    bob = client(fleet, "bob", retries=0)
    with pytest.raises(openai.NotFoundError):
        greedy(bob, "alice/a0", "x")
    with pytest.raises(openai.NotFoundError):
        greedy(bob, f"alice/a0@{fleet.revs[0]}", "x")
    c = client(fleet, retries=0)
    for model in ("alice/nope", "alice/a0:nope", "no such model", "tinker://nope/sampler_weights/x"):
        with pytest.raises((openai.NotFoundError, openai.BadRequestError)) as e:
            greedy(c, model, "x")
        assert e.value.message
    with pytest.raises(openai.BadRequestError, match="2048"):
        c.completions.create(model="alice/a0", prompt="hi", max_tokens=5000)
    for bad in (dict(temperature=5.0), dict(n=0), dict(top_p=0.0), dict(presence_penalty=3.0), dict(max_tokens=0)):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="alice/a0", prompt="hi", **{"max_tokens": 2, **bad})
        assert e.value.message
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="tml-wrong", max_retries=0).models.list()


def test_metrics_move(fleet):
    for name, labels in (("lorafleet_residency_hits_total", 'tier="slot"'),
                         ("lorafleet_residency_misses_total", 'tier="host"'),
                         ("lorafleet_cold_loads_total", ""), ("lorafleet_cold_load_seconds_count", ""),
                         ("lorafleet_residency_evictions_total", 'tier="host"'),
                         ("lorafleet_batch_rows_count", 'kind="sample"'),
                         ("lorafleet_tokens_total", 'kind="completion"'),
                         ("lorafleet_request_seconds_count", 'api="openai"'),
                         ("lorafleet_time_to_first_token_seconds_count", 'api="openai"')):
        assert metric(fleet, name, labels) > 0, name
    assert "lorafleet_cold_load_queue_depth" in httpx.get(f"{fleet.url}/metrics").text


def test_an_adapter_of_other_base_weights_under_the_same_name_is_refused(fleet, tiny_pair):
    """The base's identity is its weight digest: an adapter recorded against another copy of
    `lorafleet/tiny-llama` (other weights, same name) is a 400, never silently served."""
    catalog = fleet.app.state.catalog
    catalog.create_policy(ADMIN, "alice/other-copy", TINY, SPEC, base_digest="0" * 64)
    catalog.publish_weights(ADMIN, "alice/other-copy", adapter_weights(tiny_pair[0].info, 7), aliases=["prod"])
    with pytest.raises(openai.BadRequestError, match="sha256"):
        client(fleet).completions.create(model="alice/other-copy:prod", prompt="Hi", max_tokens=2)
    matching = client(fleet).completions.create(model="alice/a0:prod", prompt="Hi", max_tokens=2)
    assert matching.choices[0].text is not None
