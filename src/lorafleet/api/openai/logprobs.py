"""Logprobs in OpenAI's two wire shapes, from the engine's per-token logprobs and top k.

Every logprob is of the model's raw distribution (engine/sampling.py), as vLLM returns by
default. Completions: `top_logprobs[i]` maps token strings to logprobs for the top k and the
chosen token (OpenAI's and vLLM's rule: k or k + 1 entries); chat: `top_logprobs` lists the
top k exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.api.openai import schemas as s
from lorafleet.engine.types import SampledSequence, TopLogprobs


@dataclass(frozen=True, slots=True)
class Entry:
    """One position: the token there, its logprob (None: the first prompt token) and top k."""

    token: int
    logprob: float | None
    top: TopLogprobs | None = None


def sequence_entries(seq: SampledSequence) -> list[Entry]:
    tops = seq.top_logprobs or [None] * len(seq.tokens)
    return [Entry(t, lp, top) for t, lp, top in zip(seq.tokens, seq.logprobs, tops)]


def prompt_entries(prompt: list[int], logprobs: list[float | None] | None,
                   tops: list[TopLogprobs | None] | None) -> list[Entry]:
    lps = logprobs or [None] * len(prompt)
    tops = tops or [None] * len(prompt)
    return [Entry(t, lp, top) for t, lp, top in zip(prompt, lps, tops)]


def token_str(tokenizer, token: int, as_ids: bool) -> str:
    return f"token_id:{token}" if as_ids else tokenizer.decode([token], skip_special_tokens=False)


def completion(tokenizer, entries: list[Entry], k: int, as_ids: bool, offset: int = 0) -> s.CompletionLogprobs:
    """`offset`: the text offset of the first entry (streamed chunks continue the count)."""
    pieces = [token_str(tokenizer, e.token, as_ids) for e in entries]
    offsets = []
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece)
    tops: list[dict[str, float] | None] | None = None
    if k > 0:
        tops = []
        for e, piece in zip(entries, pieces):
            if e.logprob is None:
                tops.append(None)
                continue
            top = {token_str(tokenizer, t, as_ids): v for t, v in (e.top or [])[:k]}
            top.setdefault(piece, e.logprob)
            tops.append(top)
    return s.CompletionLogprobs(tokens=pieces, token_logprobs=[e.logprob for e in entries],
                                top_logprobs=tops, text_offset=offsets)


def chat(tokenizer, entries: list[Entry], k: int, as_ids: bool) -> s.ChoiceLogprobs:
    def item(token: int, logprob: float) -> dict:
        piece = token_str(tokenizer, token, as_ids)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    content = []
    for e in entries:
        top = [item(t, v) for t, v in (e.top or [])[:k]]
        content.append(s.TokenLogprob(**item(e.token, e.logprob), top_logprobs=top))  # type: ignore[arg-type]
    return s.ChoiceLogprobs(content=content)
