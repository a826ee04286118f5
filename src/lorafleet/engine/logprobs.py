"""What a forward of a prompt can say about it: prompt logprobs, their top-k, the logprobs of
named tokens, and draws from the next-token distribution at every position.

Pure: a prompt's logits in (position i predicts token i + 1), records out. The engine feeds
it from one chunked forward of the prompt (`Engine.score_prompt`); any other path that has a
prompt's logits (a prefill) can call `PromptScorer.feed` chunk by chunk the same way, and
`topk_logprobs` is the one top-k extraction (also for sampled tokens).

Alignment follows Tinker's `SampleResponse`: entry i of `logprobs` / `topk` scores prompt
token i (entry 0 has no context: None / sentinel row); row i of `targets` and `alt_*` scores
prompt position i + 1, so they have len(prompt) - 1 rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MASK_LOGPROB = -99999.0  # Tinker's TopkLogprobs sentinel (token id 0, this logprob): not scored


@dataclass(frozen=True, slots=True)
class PromptScoring:
    """What to compute over a prompt (every field off by default).

    Args:
        logprobs: log p(prompt[i] | prompt[:i]) for every scored position.
        topk: the k most likely tokens (and logprobs) at every scored position; 0 = off.
        last_n: score only the last n prompt tokens (logprobs and topk); None = all.
        targets: int64 [len(prompt) - 1, K] token ids to score, row i at position i + 1;
            -1 = nothing asked in that cell.
        alt_k: draws per position after the first, with replacement, from the next-token
            distribution at `temperature` (0: the argmax); 0 = off.
        seed: seeds the draws (None: fresh randomness).
    """

    logprobs: bool = False
    topk: int = 0
    last_n: int | None = None
    targets: Tensor | None = None
    alt_k: int = 0
    temperature: float = 1.0
    seed: int | None = None

    @property
    def full_logits(self) -> bool:
        """Whether every prompt position's logits are needed (not just the last)."""
        return self.logprobs or self.topk > 0 or self.targets is not None or self.alt_k > 0


@dataclass(frozen=True, slots=True)
class PromptScores:
    """Results of a `PromptScoring`; each field None when it was not asked for.

    logprobs: len(prompt), None where not scored. topk_ids / topk_logprobs: int64 / float32
    [len(prompt), k], sentinel rows (0, MASK_LOGPROB) where not scored. targets: float32
    [len(prompt) - 1, K], 0.0 where the request had -1. alt_tokens / alt_logprobs: int64 /
    float32 [len(prompt) - 1, alt_k], the draws and the model's (temperature 1) logprobs.
    """

    logprobs: list[float | None] | None = None
    topk_ids: Tensor | None = None
    topk_logprobs: Tensor | None = None
    targets: Tensor | None = None
    alt_tokens: Tensor | None = None
    alt_logprobs: Tensor | None = None


def topk_logprobs(logprobs_NV: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k most likely tokens of each row of log-probabilities: (ids int64 [N, k], logprobs
    float32 [N, k]), most likely first (ties: the lower id first, as torch.topk on CPU)."""
    k = min(k, logprobs_NV.shape[-1])
    values, ids = torch.topk(logprobs_NV.float(), k, dim=-1)
    return ids.to(torch.int64), values.float()


class PromptScorer:
    """Accumulates `PromptScores` from a prompt's logits, fed in position order by chunks."""

    def __init__(self, prompt: list[int], scoring: PromptScoring) -> None:
        self.prompt = prompt
        self.s = scoring
        p = len(prompt)
        self.first_scored = 1 if scoring.last_n is None else max(1, p - scoring.last_n)
        self.lps: list[float | None] = [None] * p
        self.top_ids = torch.zeros(p, scoring.topk, dtype=torch.int64)
        self.top_lps = torch.full((p, scoring.topk), MASK_LOGPROB, dtype=torch.float32)
        k = 0 if scoring.targets is None else scoring.targets.shape[1]
        self.target_lps = torch.zeros(max(p - 1, 0), k, dtype=torch.float32)
        self.alt_tokens = torch.zeros(max(p - 1, 0), scoring.alt_k, dtype=torch.int64)
        self.alt_lps = torch.zeros(max(p - 1, 0), scoring.alt_k, dtype=torch.float32)
        self.gen = torch.Generator()
        if scoring.seed is None:
            self.gen.seed()
        else:
            self.gen.manual_seed(scoring.seed & ((1 << 63) - 1))

    def feed(self, start: int, logits_TV: Tensor) -> None:
        """The logits at prompt positions start .. start + T - 1 (each predicts the next token)."""
        p = len(self.prompt)
        # position j's logits predict prompt token j + 1: keep those with a next prompt token
        n = min(logits_TV.shape[0], p - 1 - start)
        if n <= 0:
            return
        lp_TV = torch.log_softmax(logits_TV[:n].float(), dim=-1).cpu()
        rows = torch.arange(start, start + n)  # row r scores prompt token r + 1
        s = self.s
        scored = rows + 1 >= self.first_scored
        if s.logprobs:
            nxt = torch.tensor(self.prompt[start + 1: start + 1 + n], dtype=torch.int64)
            values = lp_TV.gather(1, nxt[:, None])[:, 0].tolist()
            for r, v, keep in zip(rows.tolist(), values, scored.tolist()):
                if keep:
                    self.lps[r + 1] = v
        if s.topk:
            ids, values = topk_logprobs(lp_TV[scored], s.topk)
            at = rows[scored] + 1
            self.top_ids[at, : ids.shape[1]] = ids
            self.top_lps[at, : values.shape[1]] = values
        if s.targets is not None and s.targets.shape[1]:
            want = s.targets[start: start + n]
            cells = want.clamp(min=0)
            got = lp_TV.gather(1, cells)
            self.target_lps[start: start + n] = torch.where(want >= 0, got, torch.zeros_like(got))
        if s.alt_k:
            if s.temperature == 0:
                draws = lp_TV.argmax(dim=-1, keepdim=True).expand(-1, s.alt_k)
            else:
                probs = torch.softmax(lp_TV / s.temperature, dim=-1)
                draws = torch.multinomial(probs, s.alt_k, replacement=True, generator=self.gen)
            self.alt_tokens[start: start + n] = draws
            self.alt_lps[start: start + n] = lp_TV.gather(1, draws)

    def result(self) -> PromptScores:
        s = self.s
        return PromptScores(
            logprobs=self.lps if s.logprobs else None,
            topk_ids=self.top_ids if s.topk else None,
            topk_logprobs=self.top_lps if s.topk else None,
            targets=self.target_lps if s.targets is not None else None,
            alt_tokens=self.alt_tokens if s.alt_k else None,
            alt_logprobs=self.alt_lps if s.alt_k else None,
        )


def score_prompt(logits_PV: Tensor, prompt: list[int], scoring: PromptScoring) -> PromptScores:
    """All of `scoring` from the logits of every prompt position at once (a reference)."""
    scorer = PromptScorer(prompt, scoring)
    scorer.feed(0, logits_PV)
    return scorer.result()


__all__ = ["MASK_LOGPROB", "PromptScorer", "PromptScores", "PromptScoring", "score_prompt", "topk_logprobs"]
