"""Sample jobs that ask for scores over their prompt (`SampleRequest.scoring`).

The scheduler runs one forward of each such prompt when the job is admitted (its adapter is
in a slot by then), with the same LoRA operands decoding uses. A job whose requests all want
a single new token (`max_tokens == 1`, how distillation recipes read a teacher's top-k) is
answered from that forward alone: the token is chosen from its last logits with the
request's own sampling rule and seeded generator, so nothing is prefilled twice. Other jobs
go on to the decoder and get their scores attached when they finish. The prompts scored in one
scheduler step count against its token budget (`Budgets.max_num_batched_tokens`), so a queue of
them holds decoding rows for about one step's budget at most (one long prompt may exceed it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from lorafleet.engine.generate import _generator
from lorafleet.engine.logprobs import PromptScores
from lorafleet.engine.sampling import choose_tokens
from lorafleet.engine.types import SampledSequence, SampleRequest, SampleResult
from lorafleet.lora.layers import RowOperands

Scored = list[tuple[PromptScores | None, Tensor | None]]  # per request: scores, last logits [1, V]


def wants_scores(requests: list[SampleRequest]) -> bool:
    return any(r.scoring is not None for r in requests)


def score(engine, requests: list[SampleRequest], operands: RowOperands) -> Scored:
    """The scoring forward of every request that asks for one (None for the others)."""
    return [engine.score_prompt(r.prompt, r.scoring, operands) if r.scoring is not None else (None, None)
            for r in requests]


def answerable(requests: list[SampleRequest]) -> bool:
    """Whether the scoring forward alone answers the job: one new token per sample, no routes."""
    return all(r.scoring is not None and r.params.max_tokens == 1 and not r.record_routes
               for r in requests)


def one_token_results(engine, requests: list[SampleRequest], scored: Scored,
                      on_token: Callable[..., None]) -> list[SampleResult]:
    """Results of an `answerable` job: each sample's token from the prompt's last logits."""
    eos = engine.base.eos_token_id
    out = []
    for i, (req, (scores, last)) in enumerate(zip(requests, scored)):
        p = req.params
        n = req.num_samples
        chosen = choose_tokens(last.expand(n, -1), [p.temperature] * n, [p.top_k] * n,
                               [p.top_p] * n, [_generator(p.seed, k) for k in range(n)],
                               top_n=p.top_logprobs, min_ps=[p.min_p] * n)
        tokens, lps = chosen.tokens, chosen.logprobs
        stop_ids = {eos} if p.stop_token_ids is None else set(p.stop_token_ids)
        seqs = []
        for k in range(n):
            tok = int(tokens[k])
            top = chosen.top(k, p.top_logprobs)
            on_token(i, k, tok, float(lps[k]), top)
            text = engine.base.tokenizer.decode([tok], skip_special_tokens=False) if p.stop_strings else ""
            stop = tok in stop_ids or any(s in text for s in p.stop_strings)
            seqs.append(SampledSequence([tok], [float(lps[k])], "stop" if stop else "length",
                                        top_logprobs=None if top is None else [top]))
        out.append(SampleResult(seqs, prompt_logprobs=None, prompt_scores=scores))
    return out


def attach(results: list[SampleResult], scored: Scored) -> list[SampleResult]:
    """Decoded results with the scores of their prompts."""
    return [dataclasses.replace(r, prompt_scores=s) if s is not None else r
            for r, (s, _) in zip(results, scored)]


def operands_for(table, slot: int) -> RowOperands:
    return table.operands(torch.tensor([slot], dtype=torch.int64))
