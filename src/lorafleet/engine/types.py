"""Records of sampling work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from torch import Tensor

if TYPE_CHECKING:
    from lorafleet.engine.grammar import Grammar

StopReason = Literal["stop", "length", "abort"]  # abort: stopped by on_token (client gone)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample one prompt.

    Args:
        max_tokens: new tokens at most (>= 1).
        temperature: 0 = greedy; otherwise softmax(logits / temperature).
        top_p: nucleus mass kept (1 = off). top_k: tokens kept (-1 or 0 = off).
        seed: same seed, same request -> same tokens; None = fresh randomness.
        stop_strings: stop once the decoded completion contains one (the tokens up to and
            including the one that completed it are returned).
        stop_token_ids: stop on any of these ids (the id is returned); None = the EOS token;
            an empty tuple disables stopping on tokens.
        grammar: structured output (engine/grammar.py): every token must keep the completion a
            prefix of the grammar's language; the stop tokens are allowed only once it is complete.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None
    grammar: Grammar | None = None


@dataclass(frozen=True, slots=True)
class SampleRequest:
    """Sample `num_samples` completions of `prompt` with an adapter (None = the base)."""

    adapter: int | None
    prompt: list[int]
    num_samples: int = 1
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt_logprobs: bool = False
    record_routes: bool = False  # MoE bases: return the experts chosen (SampledSequence.routes)


@dataclass(frozen=True, slots=True)
class SampledSequence:
    """Generated tokens, the model's logprob of each (temperature 1, unfiltered), and why it ended."""

    tokens: list[int]
    logprobs: list[float]
    stop_reason: StopReason
    # with SampleRequest.record_routes on a MoE base: the expert ids every router chose at every
    # position fed to the model (prompt + tokens[:-1]), int32 [moe_layers, positions, top_k];
    # pass it as Datum.routes to replay the same experts in training (R3)
    routes: Tensor | None = None


@dataclass(frozen=True, slots=True)
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None  # None at index 0 (nothing predicts it)
