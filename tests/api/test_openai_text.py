from lorafleet.api.openai.text import IncrementalText, truncate_at_stop


class CharTokenizer:
    """Token i decodes to chr(i); 0 is a special token that skip_special_tokens drops."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))


def test_truncate_at_earliest_stop():
    assert truncate_at_stop("abc STOP def END", ["END", "STOP"]) == ("abc ", True)
    assert truncate_at_stop("abc", ["x"]) == ("abc", False)


def test_streamed_deltas_join_to_the_final_text_and_hold_back_stop_prefixes():
    inc = IncrementalText(CharTokenizer(), ["XY"])
    deltas = [inc.push(ord(c)) for c in "abX"]
    assert "".join(deltas) == "ab"  # "X" might start "XY": held back
    assert inc.push(ord("c")) == "Xc"
    assert inc.push(ord("X")) == "" and inc.push(ord("Y")) == ""
    assert inc.stopped and inc.finish() == ""


def test_finish_flushes_the_held_back_tail():
    inc = IncrementalText(CharTokenizer(), ["XY"])
    assert inc.push(ord("a")) + inc.push(ord("X")) == "a"
    assert inc.finish() == "X"
