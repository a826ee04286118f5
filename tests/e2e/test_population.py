"""Population voting on a real server (tiny-llama, real engine and catalog): 9 adapters whose
greedy answers are known by construction - 4 zero adapters (B = 0: exactly the base's answer),
3 copies of one random adapter, 2 copies of another - so the majority is the base's answer
with 4 votes against 3 and 2. Each member's answer equals the same adapter asked alone, the 9
members decode as one batch (the engine's step count), ties and abstentions have their defined
outcomes, selectors (glob, alias) find the same population, and bad requests are 4xx.
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from lorafleet.catalog.records import ADMIN
from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.weights import LoraWeights
from tests.e2e.conftest import TINY, start_server

SPEC = LoraSpec(rank=2, alpha=16.0, target_modules=("q_proj", "v_proj", "down_proj"))
PROMPT = "The capital of France is"
MAX_TOKENS = 4
WHOLE = {"regex": r"(?s).+"}  # the whole completion is the answer
# member -> the weights it gets: z* are zero adapters, r1* one random adapter, r2* another
MEMBERS = ["z0", "r1a", "z1", "r2a", "r1b", "z2", "r2b", "r1c", "z3"]


def weights(info, kind: str) -> LoraWeights:
    w = LoraWeights.init(info, SPEC, seed=0)  # PEFT init: B = 0, the base's outputs exactly
    if kind == "z":
        return w
    g = torch.Generator().manual_seed({"r1": 11, "r2": 22}[kind])
    return LoraWeights(SPEC, {p: (a * 4, torch.randn(b.shape, generator=g) * 0.5) for p, (a, b) in w.pairs.items()})


@pytest.fixture(scope="module")
def pop(paths, tiny_pair, tmp_path_factory):
    live = start_server(paths, [TINY], tmp_path_factory.mktemp("population"), engines={TINY: tiny_pair})
    catalog = live.app.state.catalog
    info = tiny_pair[0].info
    for m in MEMBERS:
        kind = m[:2] if m[0] == "r" else "z"
        catalog.create_policy(ADMIN, f"alice/variant-{m}", TINY, SPEC, metadata={"family": kind})
        catalog.publish_weights(ADMIN, f"alice/variant-{m}", weights(info, kind))
    for m in ("z0", "r1a", "r2a"):
        catalog.set_alias(ADMIN, f"alice/variant-{m}", "tagged")
    catalog.create_policy(ADMIN, "alice/other-z", TINY, SPEC)  # not matched by variant-*
    catalog.publish_weights(ADMIN, "alice/other-z", weights(info, "z"))
    live.http = httpx.Client(base_url=live.url, timeout=120)
    yield live
    live.http.close()
    live.stop()


def vote(pop, **body) -> httpx.Response:
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "extract": WHOLE} | body
    return pop.http.post("/v1/population/completions", json=body)


def alone(pop, model: str) -> str:
    c = openai.OpenAI(base_url=f"{pop.url}/v1", api_key="tml-local", max_retries=0)
    return c.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0).choices[0].text


def test_majority_of_nine_known_by_construction(pop):
    names = [f"alice/variant-{m}" for m in MEMBERS]
    solo = {m: alone(pop, n).strip() for m, n in zip(MEMBERS, names)}
    base = alone(pop, TINY).strip()
    x, y, z = solo["z0"], solo["r1a"], solo["r2a"]
    assert x == base and len({x, y, z}) == 3, (x, y, z)  # the construction holds
    steps = pop.app.state.openai.runners[TINY].stats["steps"]
    r = vote(pop, adapters=names)
    assert r.status_code == 200, r.text
    out = r.json()
    steps = pop.app.state.openai.runners[TINY].stats["steps"] - steps
    assert out["object"] == "population.completion" and out["model"] == TINY and out["k"] == 9
    assert out["answer"] == x and out["votes"] == {x: 4, y: 3, z: 2}
    assert out["tied"] == [] and out["abstained"] == 0
    # every member's answer is what it answers alone; in the request's order
    assert [c["model"] for c in out["choices"]] == names
    assert [c["answer"] for c in out["choices"]] == [solo[m] for m in MEMBERS]
    assert all(c["revision_id"].startswith("rev_") for c in out["choices"])
    assert out["usage"]["completion_tokens"] == 9 * MAX_TOKENS or out["usage"]["completion_tokens"] >= 9
    # one mixed batch: 9 members of MAX_TOKENS tokens in about MAX_TOKENS decode steps, not 9x
    assert steps <= MAX_TOKENS + 2, steps


def test_k_takes_the_first_members_and_ties_go_to_the_earliest_vote(pop):
    # k=5 of the 9: z0, r1a, z1, r2a, r1b -> x 2, y 2, z 1: a tie; z0 (x) votes first, so x wins
    r = vote(pop, adapters=[f"alice/variant-{m}" for m in MEMBERS], k=5).json()
    x, y = r["choices"][0]["answer"], r["choices"][1]["answer"]
    assert r["k"] == 5 and r["votes"] == {x: 2, y: 2, r["choices"][3]["answer"]: 1}
    assert r["answer"] == x and r["tied"] == [x, y]
    # the same members in another order: the earliest vote now is y's
    order = ["r1a", "z0", "z1", "r1b"]
    r = vote(pop, adapters=[f"alice/variant-{m}" for m in order]).json()
    assert r["answer"] == y and r["tied"] == [y, x]


def test_empty_extractions_abstain(pop):
    r = vote(pop, adapters=["alice/variant-z0", "alice/variant-r1a"], extract={"regex": r"\A(?!)"}).json()
    assert r["answer"] is None and r["votes"] == {} and r["abstained"] == 2
    assert [c["answer"] for c in r["choices"]] == [None, None] and r["choices"][0]["text"]


def test_selectors_glob_alias_and_metadata(pop):
    by_list = vote(pop, adapters=[f"alice/variant-{m}" for m in MEMBERS]).json()
    by_glob = vote(pop, selector={"name": "alice/variant-*"}).json()
    assert by_glob["k"] == 9 and by_glob["votes"] == by_list["votes"]  # other-z is not a member
    assert {c["model"] for c in by_glob["choices"]} == {f"alice/variant-{m}" for m in MEMBERS}
    tagged = vote(pop, selector={"name": "alice/variant-*", "alias": "tagged"}).json()
    assert sorted(c["model"] for c in tagged["choices"]) == [
        f"alice/variant-{m}:tagged" for m in ("r1a", "r2a", "z0")]
    assert sorted(tagged["votes"].values()) == [1, 1, 1] and tagged["tied"]
    zeros = vote(pop, selector={"name": "alice/variant-z?", "metadata": {"family": "z"}}, k=3).json()
    assert zeros["k"] == 3 and list(zeros["votes"].values()) == [3]


def test_chat_variant(pop):
    r = pop.http.post("/v1/population/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "extract": WHOLE,
        "adapters": ["alice/variant-z0", "alice/variant-z1", "alice/variant-r1a"]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["answer"] == out["choices"][1]["answer"]  # two zero adapters agree


@pytest.mark.parametrize("body, status, says", [
    ({"adapters": ["alice/variant-z0", "alice/nope"]}, 404, "alice/nope"),
    ({"adapters": ["alice/variant-z0"], "k": 2}, 400, "k=2 is larger"),
    ({"selector": {"name": "alice/variant-*"}, "k": 10}, 400, "k=10 is larger"),
    ({"selector": {"name": "alice/nothing-*"}}, 404, "matches no adapter"),
    ({"selector": {"name": "*/variant-z0"}}, 400, "wildcards"),
    ({"adapters": ["alice/variant-z0"], "selector": {"name": "alice/variant-*"}}, 400, "exactly one"),
    ({"adapters": ["alice/variant-z0", "alice/variant-z0"]}, 400, "more than once"),
    ({"adapters": ["alice/variant-z0", "alice/variant-z0:latest"]}, 400, "same revision"),
    ({"adapters": ["alice/variant-z0"], "extract": {"regex": "("}}, 400, "does not compile"),
    ({"adapters": ["alice/variant-z0"], "extract": {"regex": r"(x+x+)+y"}}, 400, "catastrophic"),
    ({"adapters": ["alice/variant-z0"], "extract": {"regex": "a", "group": 2}}, 400, "not a group"),
    ({"adapters": ["alice/variant-z0"], "extract": {"regex": "a", "json_field": "x"}}, 400, "exactly one"),
    ({"adapters": ["alice/variant-z0"], "extract": {"json_field": "a..b"}}, 400, "dotted path"),
    ({"adapters": ["alice/variant-z0"], "extract": {"regex": "a" * 600}}, 400, "512"),
    ({"adapters": ["alice/variant-z0"], "extractor": {"regex": "a"}}, 400, "extractor"),
    ({"adapters": ["alice/variant-z0"], "max_tokens": 100000}, 400, "context length"),
    ({"adapters": [f"m{i}/x" for i in range(129)]}, 400, "128"),
])
def test_bad_requests_are_4xx(pop, body, status, says):
    r = vote(pop, **body)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"], r.text
