"""Structured output and tool calls over the OpenAI API, with the real `openai` SDK against a real
server on loopback. tiny-llama has random weights, so only the grammar mask can make its outputs
valid: json_schema (20 prompts, validated), json_object, guided_regex / guided_choice and vLLM's
structured_outputs, n > 1, streaming, length exhaustion, mixed batches of grammar and free rows
on different adapters. Tools: SmolLM2's template has none (400 naming the base); a tiny folder
base with a Hermes-style template gets forced calls parsed into `tool_calls` (also streamed)."""

from __future__ import annotations

import json
import random
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema_rs
import openai
import pytest

from lorafleet.catalog.records import ADMIN
from lorafleet.model import smollm2
from tests.e2e.conftest import TINY, start_server
from tests.e2e.test_openai_serving import SPEC, adapter_weights
from tests.model.families import save_family

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "color", "tags", "ok"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
REGEX = r"[0-9]{3}-[a-z]{2,4}"
CHOICES = ["positive", "negative", "neutral"]
# Hermes / Qwen2.5 style: tools in the system turn, calls as <tool_call>{json}</tool_call>
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}"
    "</tools>\nCall one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>\n{{ c.function | tojson }}\n</tool_call>"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def tool_base(paths, tmp_path_factory):
    from transformers import AutoTokenizer

    folder = save_family("llama", tmp_path_factory.mktemp("toolbase") / "llama",
                         smollm2.tokenizer_dir(paths.models_dir))
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = TOOLS_TEMPLATE
    tok.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def live(paths, tiny_pair, tool_base, tmp_path_factory):
    server = start_server(paths, [TINY, tool_base], tmp_path_factory.mktemp("structured"),
                          engines={TINY: tiny_pair}, hold_s=5.0)
    catalog = server.app.state.catalog
    for i in range(2):
        catalog.create_policy(ADMIN, f"local/s{i}", TINY, SPEC)
        catalog.publish_weights(ADMIN, f"local/s{i}", adapter_weights(tiny_pair[0].info, 300 + i))
    server.client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="tml-local", max_retries=0, timeout=120)
    yield server
    server.stop()


def _prompts(n: int) -> list[str]:
    rng = random.Random(15)
    words = "alpha river stone cloud seven json tiger paper orbit lemon".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def test_json_schema_outputs_validate_for_20_random_prompts(live):
    validator = jsonschema_rs.validator_for(SCHEMA)
    prompts = _prompts(20)

    def ask(i: int):
        return live.client.chat.completions.create(
            model=TINY, messages=[{"role": "user", "content": prompts[i]}], response_format=FORMAT,
            max_tokens=200, temperature=1.0, seed=i)

    with ThreadPoolExecutor(4) as pool:  # concurrent: they share decode batches
        answers = list(pool.map(ask, range(20)))
    for r in answers:
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice
        validator.validate(json.loads(choice.message.content))
    assert len({r.choices[0].message.content for r in answers}) > 10  # sampled, not one fixed text


def test_json_object_regex_choice_and_structured_outputs(live):
    c = live.client
    r = c.completions.create(model=TINY, prompt="data:", max_tokens=300, temperature=0.7, seed=1,
                             extra_body={"structured_outputs": {"json": {"type": "object", "properties": {
                                 "a": {"type": "integer", "minimum": 0, "maximum": 9}},
                                 "required": ["a"], "additionalProperties": False}}})
    assert json.loads(r.choices[0].text)["a"] in range(10)
    r = c.completions.create(model=TINY, prompt="code:", max_tokens=20, n=3, seed=2, extra_body={"guided_regex": REGEX})
    assert [ch.finish_reason for ch in r.choices] == ["stop"] * 3
    assert all(re.fullmatch(REGEX, ch.text) for ch in r.choices), [ch.text for ch in r.choices]
    r = c.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "mood?"}], n=4, seed=3,
                                  max_tokens=10, logprobs=True, extra_body={"guided_choice": CHOICES})
    for ch in r.choices:  # logprobs of the masked distribution: every one finite, <= 0
        assert ch.message.content in CHOICES and ch.finish_reason == "stop"
        assert "".join(x.token for x in ch.logprobs.content) == ch.message.content
        assert all(-1e9 < x.logprob <= 0 for x in ch.logprobs.content)
    r = c.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "mood?"}], max_tokens=10,
                                  extra_body={"structured_outputs": {"choice": CHOICES}})
    assert r.choices[0].message.content in CHOICES


def test_json_object_parses_and_length_is_reported(live):
    """json_object: greedy tiny-llama (whose free text is not JSON) gives an object; max_tokens
    exhaustion is 'length', and the output may then be cut."""
    c = live.client
    msgs = [{"role": "user", "content": "Give me a JSON object"}]
    free = c.chat.completions.create(model=TINY, messages=msgs, max_tokens=20, temperature=0)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)
    for seed in range(3):
        r = c.chat.completions.create(model=TINY, messages=msgs, max_tokens=300, temperature=0, seed=seed,
                                      response_format={"type": "json_object"})
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = c.chat.completions.create(model=TINY, messages=msgs, max_tokens=3, temperature=1.0, seed=5,
                                  response_format=FORMAT)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith('{"')


def test_streaming_and_a_mixed_batch_of_adapters_and_free_rows(live):
    """Grammar rows and free rows on the base and two adapters at once; a streamed schema
    completion reassembles into valid JSON; free rows give what they give alone."""
    c = live.client
    validator = jsonschema_rs.validator_for(SCHEMA)
    free_alone = {m: c.completions.create(model=m, prompt="Once upon", max_tokens=12, temperature=0).choices[0].text
                  for m in (TINY, "local/s0", "local/s1")}

    def grammar_row(model: str):
        return c.completions.create(model=model, prompt="person:", max_tokens=200, seed=7, n=2,
                                    extra_body={"response_format": FORMAT}).choices

    def free_row(model: str):
        return c.completions.create(model=model, prompt="Once upon", max_tokens=12, temperature=0).choices[0].text

    def streamed(model: str):
        text, reasons = "", []
        for chunk in c.chat.completions.create(model=model, messages=[{"role": "user", "content": "p"}],
                                               response_format=FORMAT, max_tokens=200, seed=5, stream=True):
            text += chunk.choices[0].delta.content or ""
            reasons.append(chunk.choices[0].finish_reason)
        return text, reasons[-1]

    with ThreadPoolExecutor(6) as pool:
        grammar = [pool.submit(grammar_row, m) for m in (TINY, "local/s0", "local/s1")]
        free = {m: pool.submit(free_row, m) for m in (TINY, "local/s0", "local/s1")}
        stream = [pool.submit(streamed, m) for m in ("local/s1", TINY)]
        for f in grammar:
            for ch in f.result():
                assert ch.finish_reason == "stop"
                validator.validate(json.loads(ch.text))
        for m, f in free.items():
            assert f.result() == free_alone[m]
        for f in stream:
            text, reason = f.result()
            assert reason == "stop"
            validator.validate(json.loads(text))


def test_bad_constraints_are_400s_that_say_what(live):
    c = live.client
    msgs = [{"role": "user", "content": "x"}]
    cases = [
        ({"extra_body": {"guided_regex": "[a-z"}}, "invalid regex"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "strict": True, "schema": {"type": "string", "format": "weird"}}}}, "Unknown format"),
        ({"response_format": {"type": "yaml"}}, "response_format type 'yaml'"),
        ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}, "at most one"),
        ({"response_format": {"type": "json_object"}, "stop": ["}"]}, "stop cannot be combined"),
        ({"extra_body": {"guided_choice": []}}, "non-empty list"),
        ({"extra_body": {"structured_outputs": {"structural_tag": "x"}}}, "structural_tag"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=TINY, messages=msgs, max_tokens=5, **kwargs)
        assert needle in e.value.message, (kwargs, e.value.message)


def test_tools_refused_where_the_template_has_none(live):
    """SmolLM2-135M-Instruct's (and so tiny-llama's) template ignores tools: a 400 naming the base."""
    with pytest.raises(openai.BadRequestError) as e:
        live.client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "x"}],
                                            tools=[WEATHER], max_tokens=5)
    assert TINY in e.value.message and "no tool support" in e.value.message
    r = httpx.post(f"{live.url}/v1/completions", headers={"Authorization": "Bearer tml-local"},
                   json={"model": TINY, "prompt": "x", "tools": [WEATHER]})
    assert r.status_code == 400 and "tools" in r.json()["error"]["message"]


def test_forced_tool_calls_are_parsed_streamed_and_rendered_back(live, tool_base):
    c = live.client
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = c.chat.completions.create(model=tool_base, messages=msgs, tools=[WEATHER, TIME], tool_choice=named,
                                  max_tokens=60, seed=1, n=2)
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        (call,) = ch.message.tool_calls
        args = json.loads(call.function.arguments)
        assert call.function.name == "get_weather" and args["city"] in ("Paris", "Rome", "Oslo")
        assert 1 <= args["days"] <= 7 and call.id.startswith("call_")
    # "required": one or more calls of any listed function
    r = c.chat.completions.create(model=tool_base, messages=msgs, tools=[WEATHER, TIME], tool_choice="required",
                                  max_tokens=120, seed=2, parallel_tool_calls=False)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    # streamed: the calls arrive as a tool_calls delta, then finish_reason tool_calls
    calls, reasons = [], []
    for chunk in c.chat.completions.create(model=tool_base, messages=msgs, tools=[WEATHER], tool_choice=named,
                                           max_tokens=60, seed=3, stream=True):
        calls += chunk.choices[0].delta.tool_calls or []
        reasons.append(chunk.choices[0].finish_reason)
    assert reasons[-1] == "tool_calls" and [x.function.name for x in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments)["city"] in ("Paris", "Rome", "Oslo")
    # the call and its result go back through the template for the next turn
    follow = msgs + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": calls[0].id, "type": "function", "function": {"name": "get_weather", "arguments": calls[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"}]
    r = c.chat.completions.create(model=tool_base, messages=follow, tools=[WEATHER], max_tokens=5, seed=4)
    assert r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        c.chat.completions.create(model=tool_base, messages=msgs, tools=[WEATHER], max_tokens=5,
                                  tool_choice={"type": "function", "function": {"name": "nope"}})
