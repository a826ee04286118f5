"""Population voting, the pure part: pull an answer out of each completion, count the votes.

Extraction (`Extractor`): a regular expression (the named group `answer` if the pattern has
one, else group `group`, default 1 if the pattern has groups, else the whole match; the
first or the last match) or a JSON field (a dotted path into the first JSON object of the
text). The answer is the extracted text with surrounding whitespace removed; an empty result,
no match, no JSON object or a missing field is an abstention (`None`).

Regexes run on the `regex` engine with a time limit per completion, and are tried on
adversarial probe strings when the request is checked, so a catastrophic pattern is a 400
before any decoding, and one that only blows up on a real completion is a 400 too, never a
stalled worker.

Counting (`tally`): the answer with the most votes wins; a tie between several answers is
broken in favour of the one whose first vote comes earliest in the request's adapter order,
and `tied` lists every answer that shared the top count. No votes at all: `answer` is None.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import regex

from lorafleet.errors import InvalidRequest

MAX_PATTERN = 512
MATCH_TIMEOUT_S = 0.1  # per completion
PROBE_LEN = 256
CLASS_CHARS = {"d": "1", "w": "a", "s": " ", "D": "a", "W": "!", "S": "a"}


@dataclass(frozen=True, slots=True)
class Extractor:
    pattern: regex.Pattern | None = None
    group: int | str = 0
    last: bool = False
    field: tuple[str, ...] = ()

    def __call__(self, text: str) -> str | None:
        value = self._regex(text) if self.pattern is not None else self._json(text)
        value = value.strip() if value is not None else None
        return value or None

    def _regex(self, text: str) -> str | None:
        try:
            if self.last:
                m = None
                for m in self.pattern.finditer(text, timeout=MATCH_TIMEOUT_S):  # type: ignore[union-attr]
                    pass
            else:
                m = self.pattern.search(text, timeout=MATCH_TIMEOUT_S)  # type: ignore[union-attr]
        except TimeoutError:
            raise InvalidRequest(f"extract.regex took longer than {MATCH_TIMEOUT_S} s on a completion "
                                 "(catastrophic backtracking?): simplify the pattern") from None
        return None if m is None else m.group(self.group)

    def _json(self, text: str) -> str | None:
        start = text.find("{")
        decoder = json.JSONDecoder()
        while start >= 0:
            try:
                value, _ = decoder.raw_decode(text, start)
                break
            except ValueError:
                start = text.find("{", start + 1)
        else:
            return None
        for key in self.field:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        if value is None or isinstance(value, (dict, list)):
            return None if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))
        return value if isinstance(value, str) else json.dumps(value)


def compile_extractor(pattern: str | None, group: int | str | None = None, json_field: str | None = None,
                      match: str = "first") -> Extractor:
    """Check an extraction spec (exactly one of `pattern` / `json_field`); 400 naming the fault."""
    if (pattern is None) == (json_field is None):
        raise InvalidRequest("extract needs exactly one of 'regex' and 'json_field'")
    if match not in ("first", "last"):
        raise InvalidRequest(f"extract.match must be 'first' or 'last', got {match!r}")
    if json_field is not None:
        parts = tuple(json_field.split("."))
        if not json_field or len(json_field) > 256 or any(not p for p in parts):
            raise InvalidRequest(f"extract.json_field {json_field!r} must be a dotted path like 'answer' "
                                 "or 'result.value' (at most 256 characters)")
        return Extractor(field=parts)
    assert pattern is not None
    if not pattern or len(pattern) > MAX_PATTERN:
        raise InvalidRequest(f"extract.regex must be 1..{MAX_PATTERN} characters, got {len(pattern)}")
    try:
        compiled = regex.compile(pattern)
    except (regex.error, ValueError, OverflowError, RecursionError) as e:
        raise InvalidRequest(f"extract.regex does not compile: {e}") from None
    if group is None:
        group = "answer" if "answer" in compiled.groupindex else (1 if compiled.groups else 0)
    if isinstance(group, bool) or (isinstance(group, int) and not 0 <= group <= compiled.groups) or (
            isinstance(group, str) and group not in compiled.groupindex):
        raise InvalidRequest(f"extract.group {group!r} is not a group of the pattern "
                             f"({compiled.groups} groups, named: {sorted(compiled.groupindex)})")
    ex = Extractor(pattern=compiled, group=group, last=match == "last")
    for probe in probes(pattern):  # a catastrophic pattern is refused before any decoding
        try:
            compiled.search(probe, timeout=MATCH_TIMEOUT_S)
        except TimeoutError:
            raise InvalidRequest(f"extract.regex takes longer than {MATCH_TIMEOUT_S} s on a "
                                 f"{len(probe)}-character probe (catastrophic backtracking?): "
                                 "simplify the pattern") from None
    return ex


def probes(pattern: str) -> list[str]:
    """Strings that make a backtracking pattern blow up: a long run of each character the
    pattern names (literals, and one member of each class escape), then one it cannot match."""
    chars = {"a", " ", "1"}
    escaped = False
    for c in pattern:
        if escaped:
            chars.add(CLASS_CHARS.get(c, c))
            escaped = False
        elif c == "\\":
            escaped = True
        elif c.isprintable() and c not in "()[]{}|*+?^$":
            chars.add("a" if c == "." else c)
    runs = sorted(chars)[:32]
    return [c * PROBE_LEN + "\x01" for c in runs] + ["".join(runs) * (PROBE_LEN // len(runs) + 1) + "\x01"]


@dataclass(frozen=True, slots=True)
class Vote:
    answer: str | None
    votes: dict[str, int]  # answer -> count, most votes first (ties in first-vote order)
    tied: list[str]  # the answers sharing the top count when more than one does, else []
    abstained: int


def tally(answers: list[str | None]) -> Vote:
    counts = Counter(a for a in answers if a is not None)
    first = {}
    for i, a in enumerate(answers):
        if a is not None:
            first.setdefault(a, i)
    order = sorted(counts, key=lambda a: (-counts[a], first[a]))
    top = [a for a in order if counts[a] == counts[order[0]]] if order else []
    return Vote(answer=order[0] if order else None, votes={a: counts[a] for a in order},
                tied=top if len(top) > 1 else [], abstained=sum(a is None for a in answers))
