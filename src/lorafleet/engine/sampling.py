"""Pure next-token choice: logits and per-row sampling params in, tokens and logprobs out."""

from __future__ import annotations

import torch
from torch import Tensor


def filter_logits(logits_V: Tensor, top_k: int, top_p: float) -> Tensor:
    """Mask (to -inf) the tokens outside the top-k and outside the top-p nucleus."""
    out = logits_V
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


def choose_tokens(
    logits_BV: Tensor,
    temperatures: list[float],
    top_ks: list[int],
    top_ps: list[float],
    generators: list[torch.Generator],
) -> tuple[Tensor, Tensor]:
    """Pick one token per row; return (tokens_B int64, logprobs_B float32).

    The logprob is the model's own (log_softmax of the raw logits, temperature 1, no
    filtering): the quantity forward_backward computes for the same token, which RL
    importance ratios compare against.
    """
    logits_BV = logits_BV.float().cpu()  # per-row CPU generators: the same draws on every device
    logprobs_BV = torch.log_softmax(logits_BV, dim=-1)
    tokens = torch.empty(logits_BV.shape[0], dtype=torch.int64)
    for row in range(logits_BV.shape[0]):
        if temperatures[row] == 0:
            tokens[row] = torch.argmax(logits_BV[row])
            continue
        scaled = filter_logits(logits_BV[row] / temperatures[row], top_ks[row], top_ps[row])
        probs = torch.softmax(scaled, dim=-1)
        tokens[row] = torch.multinomial(probs, 1, generator=generators[row])[0]
    return tokens, logprobs_BV.gather(1, tokens[:, None])[:, 0]
