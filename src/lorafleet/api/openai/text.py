"""Detokenisation for the OpenAI API: stop-string truncation and incremental streaming text.

A completion that ended on one of its stop token ids (EOS by default) leaves that token out of
its text unless `include_stop_str_in_output`, as vLLM does; stop strings are searched only
after the text of the first `min_tokens` tokens.
"""

from __future__ import annotations

from lorafleet.api.openai.params import Output


def truncate_at_stop(text: str, stops: tuple[str, ...] | list[str], start: int = 0,
                     include: bool = False) -> tuple[str, bool]:
    """Cut `text` before (with `include`: after) the earliest stop string found at or after
    `start`; (text, whether a stop string was found)."""
    hits = [(i, len(s)) for s in stops if s for i in (text.find(s, start),) if i >= 0]
    if not hits:
        return text, False
    i, n = min(hits)
    return text[: i + n if include else i], True


def final_text(tokenizer, tokens: list[int], reason: str, out: Output) -> tuple[str, str]:
    """A finished completion's text and finish_reason ('stop' or 'length')."""
    on_token = reason == "stop" and bool(tokens) and tokens[-1] in out.stop_ids
    if on_token and not out.include_stop:
        tokens = tokens[:-1]
    text = tokenizer.decode(tokens, skip_special_tokens=out.skip_special)
    text, hit = truncate_at_stop(text, out.stops, _start(tokenizer, tokens, out), out.include_stop)
    return text, "stop" if hit or on_token or reason == "stop" else "length"


def _start(tokenizer, tokens: list[int], out: Output) -> int:
    if not out.min_tokens or not out.stops:
        return 0
    return len(tokenizer.decode(tokens[: out.min_tokens], skip_special_tokens=out.skip_special))


class IncrementalText:
    """Turns a growing token list into text deltas, holding back what a stop string or a
    half-decoded multi-byte character might still change."""

    def __init__(self, tokenizer, out: Output) -> None:
        self.tokenizer = tokenizer
        self.out = out
        self.stops = out.stops
        self.tokens: list[int] = []
        self.count = 0  # tokens pushed (stop tokens included)
        self.sent = 0  # characters already emitted
        self.done = False  # nothing more to emit
        self.stopped = False  # ended by a stop string or stop token (finish_reason 'stop')

    def push(self, token: int) -> str:
        self.count += 1
        if token in self.out.stop_ids and self.count > self.out.min_tokens:
            self.stopped = True
            if not self.out.include_stop:  # the completion ends here, without this token's text
                return self._delta(final=True)
        self.tokens.append(token)
        return self._delta(final=self.stopped)

    def finish(self) -> str:
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        if self.done:
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=self.out.skip_special)
        start = 0
        if self.out.min_tokens and self.stops:
            if len(self.tokens) < self.out.min_tokens:
                start = len(text)
            else:
                start = _start(self.tokenizer, self.tokens, self.out)
        text, hit = truncate_at_stop(text, self.stops, start, self.out.include_stop)
        if hit:
            self.stopped = True
            final = True
        safe = len(text)
        if not final:
            if text.endswith("\ufffd"):
                safe = len(text.rstrip("\ufffd"))
            # a suffix that begins some stop string may still become one
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            safe = min(safe, len(text) - hold)
        delta = text[self.sent:safe]
        self.sent = max(self.sent, safe)
        self.done = final
        return delta
