"""Records of sampling work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from lorafleet.engine.logprobs import PromptScores, PromptScoring

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
        presence_penalty / frequency_penalty: subtracted from the logit of every token already
            generated, once / once per occurrence (OpenAI's, over this row's generated tokens).
        repetition_penalty: vLLM's (CTRL's): the logit of every token in the prompt or already
            generated is divided by it when positive, multiplied when negative (1 = off).
        logit_bias: (token id, bias) pairs added to those logits at every step.
        allowed_token_ids: only these tokens can be chosen (None = all; vLLM's).
        min_p: drop tokens whose probability (after temperature) is below min_p times the
            most likely one's (0 = off; vLLM's).
        min_tokens: the stop token ids cannot be chosen (and stop strings do not stop) before
            this many tokens.
        top_logprobs: also return the k most likely tokens of every position, with their
            logprobs (0 = off; at most MAX_TOP_LOGPROBS).

    The logits pipeline (engine/logits.py) applies bias, min_tokens and penalties before the
    temperature / top-k / top-p choice; every logprob returned (of the chosen token and of
    the top k) is of the model's raw distribution (log_softmax of the unprocessed logits,
    temperature 1), as vLLM returns by default (`logprobs_mode="raw_logprobs"`).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    min_p: float = 0.0
    min_tokens: int = 0
    top_logprobs: int = 0

    @property
    def penalized(self) -> bool:
        """Whether the row needs its generated-token counts (or prompt tokens) per step."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


MAX_TOP_LOGPROBS = 20  # top-k logprobs per position, as vLLM's default max_logprobs

TopLogprobs = list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass(frozen=True, slots=True)
class SampleRequest:
    """Sample `num_samples` completions of `prompt` with an adapter (None = the base)."""

    adapter: int | None
    prompt: list[int]
    num_samples: int = 1
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0  # the k most likely tokens at every prompt position (>= 1)
    record_routes: bool = False  # MoE bases: return the experts chosen (SampledSequence.routes)
    # scores computed over the prompt in one forward of it (engine/logprobs.py; top-k, named
    # targets, draws, last-n); its result is SampleResult.prompt_scores
    scoring: PromptScoring | None = None


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
    # with SamplingParams.top_logprobs = k: the k most likely tokens at every position
    top_logprobs: list[TopLogprobs] | None = None


@dataclass(frozen=True, slots=True)
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None  # None at index 0 (nothing predicts it)
    topk_prompt_logprobs: list[TopLogprobs | None] | None = None  # likewise, with topk_prompt_logprobs
    prompt_scores: PromptScores | None = None  # for SampleRequest.scoring
