"""Structured output: grammars compiled by llguidance, applied to the batch as per-row token masks.

- `GrammarSpec` is the request's constraint as data (a JSON schema, a regex, a list of choices,
  a Lark/GBNF grammar).
- `GrammarCompiler` (one per base tokenizer) turns a spec into a `Grammar`: an immutable,
  validated template, cached per spec. Compiling is for a worker thread (the API compiles
  before it submits the job), never a compute lane.
- A row with a grammar carries its own `GrammarState` (a copy of the template's matcher,
  advanced by every token the row chooses). `constrain` masks a batch's logits right before
  sampling: tokens the grammar does not allow are -inf, and the row's stop tokens (EOS) are
  allowed only where the grammar is complete. A row whose grammar can take no further token
  ends with stop reason "stop"; one that reaches max_tokens first ends with "length" (its
  output may then be incomplete).

Why llguidance: it installs from PyPI as one abi3 wheel with no dependencies (xgrammar pulls
torch/triton; outlines-core precompiles a whole-vocabulary index per regex), computes masks
lazily per step in Rust with the GIL released (so a batch's masks are computed in parallel),
and takes JSON schema, regex, choices and Lark/GBNF grammars.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lorafleet.errors import InvalidRequest

log = logging.getLogger(__name__)

GrammarKind = Literal["json_schema", "regex", "choice", "grammar", "lark"]

# JSON as `json.dumps` writes it (", " and ": ", no other whitespace): what models are used to
# reading, and bounded, so a row cannot spend its tokens on whitespace
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """A constraint on a completion.

    Args:
        kind: json_schema (source: the schema as JSON text), regex, choice (source: a JSON
            list of strings), grammar (Lark or GBNF text), lark (Lark text only: it may embed
            JSON schemas with llguidance's `%json {...}`).
        strict: json_schema only: refuse schema keywords the compiler cannot enforce (otherwise
            they are ignored, and the rest of the schema is still enforced).
    """

    kind: GrammarKind
    source: str
    strict: bool = True


class Grammar:
    """A compiled grammar: a validated template matcher; `start()` gives a row its own state."""

    __slots__ = ("spec", "vocab_size", "eos", "_template")

    def __init__(self, spec: GrammarSpec, vocab_size: int, eos: tuple[int, ...], template) -> None:
        self.spec = spec
        self.vocab_size = vocab_size
        self.eos = eos  # the tokenizer's EOS ids, which llguidance allows where complete
        self._template = template

    @property
    def compiled(self) -> bool:
        return self._template is not None

    def start(self) -> GrammarState:
        if self._template is None:
            raise RuntimeError(f"{self!r} crossed a process boundary and was not compiled again there")
        return GrammarState(self._template.deep_copy(), self.eos)

    def __reduce__(self):
        # llguidance matchers do not pickle: a grammar crosses a process boundary (to an engine
        # actor, fleet/worker.py) as its spec, and the other side compiles it again (cached)
        return (Grammar, (self.spec, self.vocab_size, self.eos, None))

    def __repr__(self) -> str:
        return f"Grammar({self.spec.kind}, {len(self.spec.source)} chars)"


class GrammarState:
    """One row's position in its grammar."""

    __slots__ = ("matcher", "eos")

    def __init__(self, matcher, eos: tuple[int, ...]) -> None:
        self.matcher = matcher
        self.eos = list(eos)

    @property
    def complete(self) -> bool:
        """The text so far is a full sentence of the grammar (the row may stop here)."""
        return self.matcher.is_accepting()

    @property
    def finished(self) -> bool:
        """The grammar takes no further token: the row is done."""
        return self.matcher.is_stopped()

    def advance(self, token: int) -> bool:
        """Take the row's chosen (non-stop) token; whether the grammar is finished now."""
        if not self.matcher.consume_token(token):
            # the mask allowed only tokens the grammar takes, so this is a bug, not bad input
            raise RuntimeError(f"grammar refused token {token}: {self.matcher.get_error()}")
        return self.finished


class GrammarCompiler:
    """Compiles specs against one tokenizer; results are cached (LRU) per spec. Thread-safe.

    Args:
        tokenizer: the base's Hugging Face fast tokenizer.
        vocab_size: the model's logits width (may exceed the tokenizer's: padded embeddings).
        cache_size: compiled grammars kept.
    """

    def __init__(self, tokenizer, vocab_size: int, cache_size: int = 256) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._lltok = None
        self._cache: OrderedDict[GrammarSpec, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def ll_tokenizer(self):
        """llguidance's tables of the tokenizer, built on first use (reads the HF tokenizer:
        callers that share it across threads call this under their tokenizer lock)."""
        import llguidance.hf

        with self._lock:
            if self._lltok is None:  # ~1 s once per base: the tokenizer's tables
                self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
            return self._lltok

    def compile(self, spec: GrammarSpec) -> Grammar:
        """Blocking: validate and compile `spec` (InvalidRequest if it is not a valid grammar)."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        template = self._template(spec)
        grammar = Grammar(spec, self.vocab_size, tuple(self.ll_tokenizer().eos_tokens), template)
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _template(self, spec: GrammarSpec):
        import llguidance as llg

        lltok = self.ll_tokenizer()
        text = _ll_grammar(spec)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text, lltok)
        if is_error or (spec.kind == "json_schema" and spec.strict and messages):
            raise InvalidRequest(f"invalid {_WHAT[spec.kind]}: {'; '.join(messages)}")
        matcher = llg.LLMatcher(lltok, text, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"invalid {_WHAT[spec.kind]}: {matcher.get_error()}")
        return matcher


_WHAT = {"json_schema": "JSON schema", "regex": "regex", "choice": "choice list", "grammar": "grammar",
         "lark": "grammar"}


def _ll_grammar(spec: GrammarSpec) -> str:
    import llguidance as llg

    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.source)
        except ValueError as e:
            raise InvalidRequest(f"the JSON schema is not JSON: {e}") from None
        if not isinstance(schema, dict):
            raise InvalidRequest("a JSON schema must be an object")
        options = {**JSON_OPTIONS, "lenient": not spec.strict}
        try:
            return llg.LLMatcher.grammar_from_json_schema(schema, overrides=options)  # type: ignore[arg-type]
        except ValueError as e:
            raise InvalidRequest(f"invalid JSON schema: {e}") from None
    if spec.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec.source)
    if spec.kind == "choice":
        choices = json.loads(spec.source)
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise InvalidRequest("choices must be a non-empty list of non-empty strings")
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    if spec.kind == "lark":
        return llg.LLMatcher.grammar_from_lark(spec.source)
    try:
        return llg.grammar_from("grammar", spec.source)
    except ValueError as e:
        raise InvalidRequest(f"invalid grammar: {e}") from None


# ---- the decode step ------------------------------------------------------------------------

_executor = None
_executor_lock = threading.Lock()


def _ll_executor():
    global _executor
    import llguidance as llg

    with _executor_lock:
        if _executor is None:
            _executor = llg.LLExecutor(num_threads=max(1, min(8, os.cpu_count() or 1)))
        return _executor


def allowed_tokens(states: list[GrammarState], stop_ids: list[frozenset[int]], vocab: int) -> np.ndarray:
    """bool [len(states), vocab]: the tokens each row's grammar allows next; its stop ids only
    where the grammar is complete. The masks are computed in parallel, without the GIL."""
    words = (vocab + 31) // 32
    bitmask = np.zeros((len(states), words), dtype=np.int32)
    pairs = [(s.matcher, i) for i, s in enumerate(states)]
    _ll_executor().unsafe_compute_mask_ptr(pairs, bitmask.ctypes.data, words * 4, len(states))
    # bit j of word w is token 32 w + j: little-endian words, so bytes in order, bits low first
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
    for i, (state, stops) in enumerate(zip(states, stop_ids)):
        allowed[i, state.eos] = False  # llguidance allows EOS where complete; the row's stops decide
        if stops:
            allowed[i, list(stops)] = state.complete
        if not allowed[i].any():  # cannot happen for a live grammar; end the row rather than NaN
            log.error("grammar allows no token (%s); ending the row", state.matcher.get_error())
            allowed[i, list(stops) or state.eos] = True
    return allowed


def constrain(logits_BV: Tensor, states: list[GrammarState | None], stop_ids: list[frozenset[int]]) -> Tensor:
    """The logits with every grammar row's disallowed tokens at -inf (rows without a grammar,
    and the input tensor, untouched). Call right before sampling. With any grammar row the
    result is a float32 CPU tensor (where sampling happens anyway: engine/sampling.py)."""
    rows = [b for b, s in enumerate(states) if s is not None]
    if not rows:
        return logits_BV
    allowed = allowed_tokens([states[b] for b in rows], [stop_ids[b] for b in rows], logits_BV.shape[-1])  # type: ignore[misc]
    out = np.array(logits_BV.detach().float().cpu().numpy())  # a copy: numpy's boolean fill is the fast one
    for i, b in enumerate(rows):
        out[b, ~allowed[i]] = -np.inf
        if not np.isfinite(out[b]).any():
            # the row's other settings (allowed_token_ids, logit_bias -100, min_tokens) exclude
            # every token its grammar allows: end the row (stop) rather than sample from nothing
            stops = list(stop_ids[b]) or states[b].eos  # type: ignore[union-attr]
            log.warning("row %d: no token allowed by both its grammar and its sampling settings; ending it", b)
            out[b, stops] = 0.0
    return torch.from_numpy(out)
