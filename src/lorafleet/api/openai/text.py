"""Detokenisation for the OpenAI API: stop-string truncation and incremental streaming text."""

from __future__ import annotations


def truncate_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut `text` before the earliest stop string; (text, whether a stop string was found)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class IncrementalText:
    """Turns a growing token list into text deltas, holding back what a stop string or a
    half-decoded multi-byte character might still change."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.tokens: list[int] = []
        self.sent = 0  # characters already emitted
        self.stopped = False

    def push(self, token: int) -> str:
        self.tokens.append(token)
        return self._delta(final=False)

    def finish(self) -> str:
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        text, hit = truncate_at_stop(text, self.stops)
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
        return delta
