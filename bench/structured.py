"""Structured output cost: decoding with a grammar mask per row vs the same rows free.

SmolLM2-135M-Instruct, fp32, the engine scheduler (continuous batching, engine/decode.py),
16 rows (8 prompts x n=2), every row made to produce exactly 64 new tokens (--quick: 16):
free rows with EOS stopping off; grammar rows with a Lark grammar of an open JSON array of
{"name": string, "n": integer} objects (llguidance's `%json`, no closing bracket) and EOS
stopping off, so both variants decode the same number of tokens. A third variant mixes them (8 grammar + 8 free
rows). Interleaved, medians over repeats. Grammars are compiled before timing (as the API
does, off the compute thread, cached per schema).

Prints one JSON line: tok_s_{free,grammar,mixed}, grammar_over_free and mixed_over_free
(tokens/s ratios, measured in the same run), mask_ms_per_step_16 (constrain() alone, 16 rows).

    .venv/bin/python bench/structured.py [--quick] [--threads 2]
"""

from __future__ import annotations

import json
import threading
import time

from _common import SMOL, emit, interleaved, median, note, parse_args, set_threads

from lorafleet.engine.grammar import JSON_OPTIONS  # json.dumps layout, as the API uses

ITEM = {"x-guidance": JSON_OPTIONS, "type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
        "required": ["name", "n"], "additionalProperties": False}
LARK = f'start: "[" item (", " item)*\nitem: %json {json.dumps(ITEM)}'  # never finished
QUESTIONS = ["List some people and their ages.", "Name fruits with counts.", "Cities and populations?",
             "Give me pets and their legs.", "Books and their page counts.", "Planets and moons.",
             "Colors and their wavelengths.", "Teams and their scores."]


class Sink:
    """The job's outcome, waited for on an event."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.outcome = None

    def done(self, job, result) -> None:
        self.outcome = result
        self.event.set()

    def failed(self, job, error) -> None:
        self.outcome = error
        self.event.set()

    def on_token(self, *args) -> None:
        pass


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    set_threads(args.threads)
    import torch

    from lorafleet.config import paths_from_env
    from lorafleet.engine import Engine
    from lorafleet.engine.decode import Budgets
    from lorafleet.engine.grammar import GrammarCompiler, GrammarSpec, constrain
    from lorafleet.engine.jobs import Job, Sample, WorkKind
    from lorafleet.engine.scheduler import Scheduler
    from lorafleet.engine.types import SampleRequest, SamplingParams
    from lorafleet.model import load_base

    tokens = 16 if args.quick else 64
    note("loading the base")
    base = load_base(SMOL, paths_from_env())
    engine = Engine(base)
    tok = base.tokenizer
    note("compiling")
    grammar = GrammarCompiler(tok, base.info.vocab_size).compile(GrammarSpec("lark", LARK))
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       return_dict=False) for q in QUESTIONS]
    free = SamplingParams(max_tokens=tokens, temperature=0.7, seed=1, stop_token_ids=())
    constrained = SamplingParams(max_tokens=tokens, temperature=0.7, seed=1, stop_token_ids=(), grammar=grammar)
    sched = Scheduler(engine, base, budgets=Budgets(max_num_seqs=32))
    sched.start()

    def run(kinds: list[SamplingParams]) -> None:
        sink = Sink()
        requests = [SampleRequest(None, list(p), 2, k) for p, k in zip(prompts, kinds)]
        sched.submit(Job(WorkKind.SAMPLE, Sample(requests, None), sink))
        sink.event.wait()
        if isinstance(sink.outcome, Exception):
            raise sink.outcome
        n = sum(len(q.tokens) for r in sink.outcome for q in r.sequences)
        assert n == 16 * tokens, n

    variants = {"free": [free] * 8, "grammar": [constrained] * 8, "mixed": [constrained, free] * 4}
    note(f"16 rows x {tokens} tokens, {args.repeats} repeats")
    times = interleaved({k: (lambda v=v: run(v)) for k, v in variants.items()}, args.repeats)
    sched.stop()
    tok_s = {k: 16 * tokens / median(t) for k, t in times.items()}

    states = [grammar.start() for _ in range(16)]
    for s in states:
        s.advance(tok.encode("[")[0])
    logits = torch.randn(16, base.info.vocab_size)
    stops = [frozenset({base.eos_token_id})] * 16
    t0 = time.perf_counter()
    for _ in range(20):
        constrain(logits, states, stops)
    mask_ms = (time.perf_counter() - t0) / 20 * 1000

    emit({"bench": "structured", "rows": 16, "tokens": tokens,
          "tok_s_free": tok_s["free"], "tok_s_grammar": tok_s["grammar"], "tok_s_mixed": tok_s["mixed"],
          "grammar_over_free": tok_s["grammar"] / tok_s["free"], "mixed_over_free": tok_s["mixed"] / tok_s["free"],
          "mask_ms_per_step_16": mask_ms})


if __name__ == "__main__":
    main()
