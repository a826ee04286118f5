"""Population voting's pure part: answer extraction (regex groups, first/last, JSON fields,
abstentions, bounded time) and the tally (majority, ties to the earliest vote)."""

from __future__ import annotations

import pytest

from lorafleet.api.openai.voting import compile_extractor, tally
from lorafleet.errors import InvalidRequest


@pytest.mark.parametrize("spec, text, answer", [
    ({"pattern": r"-?\d+"}, "so 12 + 30 = 42.", "12"),
    ({"pattern": r"-?\d+", "match": "last"}, "so 12 + 30 = 42.", "42"),
    ({"pattern": r"answer: (\w+)"}, "answer:  yes", None),  # \w+ needs a word right after ': '
    ({"pattern": r"answer:\s*(\w+)"}, "answer:  yes", "yes"),
    ({"pattern": r"(?P<answer>\d+) apples and (\d+)", "group": 2}, "3 apples and 4", "4"),
    ({"pattern": r"(?P<x>\d+)-(?P<answer>\d+)"}, "1-2", "2"),  # the named group `answer` by default
    ({"pattern": r"(a)|(b)", "group": 1}, "b", None),  # a group that did not take part
    ({"pattern": r"\s*"}, "   ", None),  # empty after strip: an abstention
    ({"json_field": "answer"}, 'x {"answer": 42} y', "42"),
    ({"json_field": "r.v"}, 'noise {bad} {"r": {"v": " seven "}}', "seven"),
    ({"json_field": "r"}, '{"r": {"b": 1, "a": 2}}', '{"a":2,"b":1}'),
    ({"json_field": "missing"}, '{"answer": 1}', None),
    ({"json_field": "answer"}, "no json here", None),
    ({"json_field": "answer"}, '{"answer": null}', None),
])
def test_extraction(spec, text, answer):
    ex = compile_extractor(spec.get("pattern"), spec.get("group"), spec.get("json_field"), spec.get("match", "first"))
    assert ex(text) == answer


@pytest.mark.parametrize("spec, says", [
    ({}, "exactly one"),
    ({"pattern": "a", "json_field": "b"}, "exactly one"),
    ({"pattern": "(a"}, "does not compile"),
    ({"pattern": ""}, "1..512"),
    ({"pattern": "a" * 513}, "1..512"),
    ({"pattern": "(a)", "group": 3}, "not a group"),
    ({"pattern": "(a)", "group": "nope"}, "not a group"),
    ({"pattern": r"(x+x+)+y"}, "catastrophic"),
    ({"pattern": r"(a|aa)+$"}, "catastrophic"),
    ({"json_field": ""}, "dotted path"),
    ({"json_field": "a."}, "dotted path"),
    ({"pattern": "a", "match": "middle"}, "'first' or 'last'"),
])
def test_bad_specs_are_refused(spec, says):
    with pytest.raises(InvalidRequest, match=says):
        compile_extractor(spec.get("pattern"), spec.get("group"), spec.get("json_field"), spec.get("match", "first"))


def test_a_pattern_that_explodes_on_a_completion_is_a_400_not_a_hang():
    ex = compile_extractor(r"^(\w+\s?)*$")  # passes the probes, backtracks on this text
    # the regex module's guards make this quadratic, not exponential: 5,000 characters take
    # ~0.09 s (at the 0.1 s limit, so a fast moment passed), 50,000 take ~9 s
    with pytest.raises(InvalidRequest, match="took longer"):
        ex("x" * 50_000 + "a" * 30 + "!")


def test_tally():
    v = tally(["4", "5", None, "4", "5", "6", "4"])
    assert (v.answer, v.votes, v.tied, v.abstained) == ("4", {"4": 3, "5": 2, "6": 1}, [], 1)
    tie = tally([None, "b", "a", "a", "b"])
    assert tie.answer == "b" and tie.tied == ["b", "a"] and list(tie.votes) == ["b", "a"]
    none = tally([None, None])
    assert (none.answer, none.votes, none.tied, none.abstained) == (None, {}, [], 2)
    assert tally([]).answer is None
