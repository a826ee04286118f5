from lorafleet.api.openai.params import Output
from lorafleet.api.openai.text import IncrementalText, final_text, truncate_at_stop


class CharTokenizer:
    """Token i decodes to chr(i); 0 is a special token that skip_special_tokens drops."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))


def out(stops=(), stop_ids=(0,), min_tokens=0, skip_special=True, include_stop=False) -> Output:
    return Output(tuple(stops), frozenset(stop_ids), min_tokens, skip_special, include_stop, None, False)


def codes(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_truncate_at_earliest_stop():
    assert truncate_at_stop("abc STOP def END", ["END", "STOP"]) == ("abc ", True)
    assert truncate_at_stop("abc", ["x"]) == ("abc", False)
    assert truncate_at_stop("abc STOP def END", ["END", "STOP"], include=True) == ("abc STOP", True)
    assert truncate_at_stop("STOP a STOP b", ["STOP"], start=1) == ("STOP a ", True)


def test_streamed_deltas_join_to_the_final_text_and_hold_back_stop_prefixes():
    inc = IncrementalText(CharTokenizer(), out(["XY"]))
    deltas = [inc.push(ord(c)) for c in "abX"]
    assert "".join(deltas) == "ab"  # "X" might start "XY": held back
    assert inc.push(ord("c")) == "Xc"
    assert inc.push(ord("X")) == "" and inc.push(ord("Y")) == ""
    assert inc.stopped and inc.finish() == ""


def test_finish_flushes_the_held_back_tail():
    inc = IncrementalText(CharTokenizer(), out(["XY"]))
    assert inc.push(ord("a")) + inc.push(ord("X")) == "a"
    assert inc.finish() == "X" and not inc.stopped


def test_a_stop_token_ends_the_text_without_its_own_text_unless_included():
    tok = CharTokenizer()
    assert final_text(tok, codes("abQ"), "stop", out(stop_ids=[ord("Q")])) == ("ab", "stop")
    assert final_text(tok, codes("abQ"), "stop", out(stop_ids=[ord("Q")], include_stop=True)) == ("abQ", "stop")
    assert final_text(tok, codes("abQ"), "length", out(stop_ids=[ord("Q")])) == ("abQ", "length")
    assert final_text(tok, [97, 0, 98], "length", out(skip_special=False, stop_ids=())) == ("a\x00b", "length")
    inc = IncrementalText(tok, out(stop_ids=[ord("Q")]))
    assert inc.push(ord("a")) + inc.push(ord("Q")) == "a" and inc.stopped and inc.push(ord("z")) == ""


def test_stop_strings_inside_the_first_min_tokens_do_not_count():
    tok = CharTokenizer()
    assert final_text(tok, codes("XYabXYc"), "stop", out(["XY"], min_tokens=3)) == ("XYab", "stop")
    inc = IncrementalText(tok, out(["XY"], min_tokens=3))
    streamed = "".join(inc.push(c) for c in codes("XYabXYc")) + inc.finish()
    assert streamed == "XYab" and inc.stopped
