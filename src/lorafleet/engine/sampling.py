"""Pure next-token choice: logits and per-row sampling params in, tokens and logprobs out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lorafleet.engine.types import TopLogprobs


def filter_logits(logits_V: Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> Tensor:
    """Mask (to -inf) the tokens below min_p times the top probability, outside the top-k
    and outside the top-p nucleus (vLLM's order)."""
    out = logits_V
    if min_p > 0:
        probs = torch.softmax(out, dim=-1)
        out = out.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if 0 < top_k < out.shape[-1]:
        kth = torch.topk(out, top_k).values[-1]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token once the mass before it already reaches top_p (the first always stays)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


@dataclass(frozen=True, slots=True)
class Chosen:
    """One step's choice: tokens_B (int64), their raw logprobs_B (float32), and with top_n > 0
    the top_n most likely tokens of every row (int64 / float32 [B, top_n]), all on the CPU."""

    tokens: Tensor
    logprobs: Tensor
    top_ids: Tensor | None = None
    top_logprobs: Tensor | None = None

    def top(self, row: int, k: int) -> TopLogprobs | None:
        """Row `row`'s k most likely (token, logprob), or None when k == 0."""
        if k <= 0 or self.top_ids is None or self.top_logprobs is None:
            return None
        return list(zip(self.top_ids[row, :k].tolist(), self.top_logprobs[row, :k].tolist()))


def choose_tokens(
    logits_BV: Tensor,
    temperatures: list[float],
    top_ks: list[int],
    top_ps: list[float],
    generators: list[torch.Generator],
    processed_BV: Tensor | None = None,
    top_n: int = 0,
    min_ps: list[float] | None = None,
) -> Chosen:
    """Pick one token per row from `processed_BV` (engine/logits.py; None: the raw logits).

    The logprobs (of the chosen token and the top_n) are the model's own: log_softmax of the
    raw logits, temperature 1, no filtering, no penalty or bias: the quantity forward_backward
    computes for the same token, which RL importance ratios compare against (and what vLLM
    returns by default).
    """
    unprocessed = processed_BV is None or processed_BV is logits_BV
    logits_BV = logits_BV.float().cpu()  # per-row CPU generators: the same draws on every device
    chooser = logits_BV if unprocessed else processed_BV.float().cpu()  # type: ignore[union-attr]
    logprobs_BV = torch.log_softmax(logits_BV, dim=-1)
    tokens = torch.empty(logits_BV.shape[0], dtype=torch.int64)
    for row in range(logits_BV.shape[0]):
        if temperatures[row] == 0:
            tokens[row] = torch.argmax(chooser[row])
            continue
        scaled = filter_logits(chooser[row] / temperatures[row], top_ks[row], top_ps[row],
                               min_ps[row] if min_ps else 0.0)
        probs = torch.softmax(scaled, dim=-1)
        tokens[row] = torch.multinomial(probs, 1, generator=generators[row])[0]
    chosen_lp = logprobs_BV.gather(1, tokens[:, None])[:, 0]
    if top_n <= 0:
        return Chosen(tokens, chosen_lp)
    top = torch.topk(logprobs_BV, min(top_n, logprobs_BV.shape[-1]), dim=-1)
    return Chosen(tokens, chosen_lp, top.indices, top.values)
