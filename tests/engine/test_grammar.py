"""Structured output in the engine: llguidance masks per row in the continuous decoder and in
the reference `generate`, on tiny-llama (random weights: only the mask makes outputs valid)."""

from __future__ import annotations

import json
import pickle
import re

import jsonschema_rs
import pytest

from lorafleet.engine.decode import Budgets
from lorafleet.engine.grammar import GrammarCompiler, GrammarSpec
from lorafleet.engine.jobs import Job, Sample, WorkKind
from lorafleet.engine.scheduler import Scheduler
from lorafleet.engine.types import SampleRequest, SamplingParams
from lorafleet.errors import InvalidRequest
from tests.engine.test_scheduler import FakeSink

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tag": {"enum": ["a", "b", "c"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tag", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def compiler(tiny_base):
    return GrammarCompiler(tiny_base.tokenizer, tiny_base.info.vocab_size)


@pytest.fixture(scope="module")
def sched(tiny_base):
    from lorafleet.engine import Engine

    s = Scheduler(Engine(tiny_base), tiny_base, budgets=Budgets(max_num_seqs=16))
    s.start()
    yield s
    s.stop()


def _run(sched, requests):
    sink = FakeSink()
    job = Job(WorkKind.SAMPLE, Sample(requests, None), sink)
    sched.submit(job)
    out = sink.wait(job)
    assert not isinstance(out, Exception), out
    return out


def test_mixed_batch_grammar_and_free_rows(sched, compiler, tiny_base):
    """Rows with a schema, a regex, choices and none share one batch; each grammar row is valid
    and ends with "stop" on its own (EOS only once complete); the free row is untouched."""
    tok = tiny_base.tokenizer
    schema = compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    regex = compiler.compile(GrammarSpec("regex", r"[0-9]{3}-[a-z]{2}"))
    choice = compiler.compile(GrammarSpec("choice", json.dumps(["yes", "no", "maybe"])))
    prompt = tok.encode("hello there")
    free = SamplingParams(max_tokens=12, seed=3)
    reqs = [
        SampleRequest(None, prompt, 3, SamplingParams(max_tokens=120, seed=1, grammar=schema)),
        SampleRequest(None, prompt, 2, SamplingParams(max_tokens=40, seed=2, grammar=regex)),
        SampleRequest(None, prompt, 2, SamplingParams(max_tokens=40, temperature=0, grammar=choice)),
        SampleRequest(None, prompt, 1, free),
    ]
    res = _run(sched, reqs)
    validator = jsonschema_rs.validator_for(SCHEMA)
    for seq in res[0].sequences:
        assert seq.stop_reason == "stop"
        validator.validate(json.loads(tok.decode(seq.tokens, skip_special_tokens=True)))
    for seq in res[1].sequences:
        assert seq.stop_reason == "stop" and re.fullmatch(r"[0-9]{3}-[a-z]{2}", tok.decode(seq.tokens))
    for seq in res[2].sequences:
        assert tok.decode(seq.tokens, skip_special_tokens=True) in ("yes", "no", "maybe")
    alone = _run(sched, [SampleRequest(None, prompt, 1, free)])
    assert res[3].sequences[0].tokens == alone[0].sequences[0].tokens  # a free row is unconstrained


def test_reference_generate_honours_the_grammar(tiny_engine, compiler, tiny_base):
    g = compiler.compile(GrammarSpec("regex", r"(ab|cd){2,4}!"))
    (res,) = tiny_engine.sample([SampleRequest(None, tiny_base.tokenizer.encode("x"), 2,
                                               SamplingParams(max_tokens=30, seed=0, grammar=g))])
    for seq in res.sequences:
        assert seq.stop_reason == "stop"
        assert re.fullmatch(r"(ab|cd){2,4}!", tiny_base.tokenizer.decode(seq.tokens))


def test_length_before_the_grammar_is_complete(sched, compiler, tiny_base):
    g = compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    res = _run(sched, [SampleRequest(None, [5, 6, 7], 1, SamplingParams(max_tokens=3, grammar=g))])
    seq = res[0].sequences[0]
    assert seq.stop_reason == "length" and len(seq.tokens) == 3
    assert tiny_base.tokenizer.decode(seq.tokens).startswith('{"name"')


def test_compile_is_cached_and_bad_grammars_are_invalid_requests(compiler):
    spec = GrammarSpec("regex", "[a-z]+")
    assert compiler.compile(spec) is compiler.compile(GrammarSpec("regex", "[a-z]+"))
    with pytest.raises(InvalidRequest, match="invalid regex"):
        compiler.compile(GrammarSpec("regex", "[a-z"))
    with pytest.raises(InvalidRequest, match="Unknown format"):
        compiler.compile(GrammarSpec("json_schema", json.dumps({"type": "string", "format": "weird"})))
    # not strict: what cannot be enforced is ignored, the rest still is
    compiler.compile(GrammarSpec("json_schema", json.dumps({"type": "string", "format": "weird"}), strict=False))
    with pytest.raises(InvalidRequest, match="not JSON"):
        compiler.compile(GrammarSpec("json_schema", "{"))


def test_a_grammar_crosses_processes_as_its_spec_and_compiles_again(compiler):
    g = compiler.compile(GrammarSpec("regex", "[a-z]{2}"))
    crossed = pickle.loads(pickle.dumps(g))  # what a Ray engine actor receives
    assert not crossed.compiled and crossed.spec == g.spec and crossed.eos == g.eos
    with pytest.raises(RuntimeError, match="not compiled again"):
        crossed.start()
    again = compiler.compile(crossed.spec)
    assert again is g and again.start().matcher.consume_token(compiler.tokenizer.encode("ab")[0])


def test_preempted_grammar_rows_keep_their_state_and_match_the_reference(paths, compiler):
    """Under a KV budget that preempts rows, grammar rows are recomputed with their grammar
    state kept: the same tokens as the reference `generate`, all valid."""
    from lorafleet.engine import Engine
    from lorafleet.model import load_base

    engine = Engine(load_base("lorafleet/tiny-llama", paths))
    pattern = r"([a-z]{1,3} ){30,40}[a-z]\."
    g = compiler.compile(GrammarSpec("regex", pattern))
    reqs = [SampleRequest(None, list(range(3, 3 + 10 * (i + 1))), 1,
                          SamplingParams(max_tokens=90, seed=i, temperature=0.9, grammar=g)) for i in range(4)]
    want = engine.sample(reqs)
    sched = Scheduler(engine, engine.base, budgets=Budgets(kv_cache_bytes=60_000))
    sched.start()
    try:
        got = _concurrent(sched, reqs)
    finally:
        sched.stop()
    assert sched.stats["preempted"] >= 1
    assert [x.sequences[0].tokens for x in got] == [w.sequences[0].tokens for w in want]
    for x in got:
        assert re.fullmatch(pattern, engine.base.tokenizer.decode(x.sequences[0].tokens))


def _concurrent(sched, reqs):
    sink = FakeSink()
    jobs = [Job(WorkKind.SAMPLE, Sample([r], None), sink) for r in reqs]
    for j in jobs:
        sched.submit(j)
    outs = [sink.wait(j) for j in jobs]
    assert not any(isinstance(o, Exception) for o in outs), outs
    return [o[0] for o in outs]
