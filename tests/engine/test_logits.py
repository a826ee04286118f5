"""The per-row logits pipeline against a per-token loop written from the definitions, on a
batch whose rows all have different settings; the incrementally kept history equals one
rebuilt from the rows' tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorafleet.engine.logits import History, process_logits
from lorafleet.engine.types import SamplingParams

V = 50


@dataclass
class Row:
    params: SamplingParams
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset({0})


def reference(logits: torch.Tensor, row: Row) -> torch.Tensor:
    out, p = logits.clone(), row.params
    if p.allowed_token_ids is not None:
        for t in range(V):
            if t not in p.allowed_token_ids:
                out[t] = float("-inf")
    for t, v in p.logit_bias:
        out[t] += v
    if len(row.tokens) < p.min_tokens:
        for t in row.stop_ids:
            out[t] = float("-inf")
    for t in set(row.prompt) | set(row.tokens):
        r = p.repetition_penalty
        out[t] = out[t] / r if out[t] > 0 else out[t] * r
    for t in set(row.tokens):
        out[t] -= p.frequency_penalty * row.tokens.count(t) + p.presence_penalty
    return out


ROWS = [
    SamplingParams(),
    SamplingParams(presence_penalty=1.5),
    SamplingParams(frequency_penalty=-0.7),
    SamplingParams(repetition_penalty=1.6),
    SamplingParams(repetition_penalty=0.5, presence_penalty=0.3, frequency_penalty=0.4),
    SamplingParams(logit_bias=((3, 5.0), (7, -100.0), (3, 1.0))),
    SamplingParams(min_tokens=4, logit_bias=((0, 50.0),)),
    SamplingParams(allowed_token_ids=(0, 5, 9, 17), presence_penalty=0.5),
]


def test_each_row_gets_its_own_settings_and_the_history_keeps_up():
    g = torch.Generator().manual_seed(0)
    rows = [Row(p, torch.randint(1, V, (6,), generator=g).tolist(), stop_ids=frozenset({0, 9})) for p in ROWS]
    history = History.of(rows, V, "cpu")
    for step in range(6):
        logits = torch.randn(len(rows), V, generator=g) * 3
        got = process_logits(logits, rows, history)
        for b, row in enumerate(rows):
            torch.testing.assert_close(got[b], reference(logits[b], row), msg=f"row {b} step {step}")
        # every row repeats one of its earlier tokens now and then, so the counts exceed 1
        chosen = torch.tensor([row.tokens[0] if row.tokens and step % 2 else int(torch.randint(1, V, (1,), generator=g))
                               for row in rows])
        for row, t in zip(rows, chosen.tolist()):
            row.tokens.append(t)
        history.observe(chosen)
        rebuilt = History.of(rows, V, "cpu")
        assert torch.equal(history.counts, rebuilt.counts) and torch.equal(history.prompt, rebuilt.prompt)
    # rows leave and join: select / cat keep the rows aligned
    keep = torch.tensor([4, 1, 6])
    joined = history.select(keep).cat(History.of(rows[:2], V, "cpu"))
    assert torch.equal(joined.counts, History.of([rows[4], rows[1], rows[6], *rows[:2]], V, "cpu").counts)


def test_min_p_keeps_the_tokens_near_the_top():
    from lorafleet.engine.sampling import filter_logits

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = filter_logits(logits, -1, 1.0, min_p=0.5) > float("-inf")
    assert kept.tolist() == [True, True, False, False]
    assert (filter_logits(logits, -1, 1.0, min_p=1.0) > float("-inf")).tolist() == [True, False, False, False]


def test_rows_without_settings_are_left_alone():
    logits = torch.randn(2, V)
    rows = [Row(SamplingParams(), [1, 2]), Row(SamplingParams(top_logprobs=5), [3])]
    assert process_logits(logits, rows) is logits
    assert torch.equal(process_logits(logits, [rows[0], Row(SamplingParams(presence_penalty=1.0), [1])])[0], logits[0])
