"""From an OpenAI / vLLM request to the engine's sampling settings, and what we refuse.

Every parameter of OpenAI's API and of vLLM's extensions either maps onto the engine
(`SamplingParams`, computed per row inside the batched decode) or, set to anything but its
default, is refused with a 400 that names it (`refuse_unsupported`). docs/serving.md has the
table against vLLM's OpenAI server.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.api.openai import schemas as s
from lorafleet.engine.types import SamplingParams
from lorafleet.errors import BadTokens, InvalidRequest

# fields (typed by us or left as extras) that are refused unless they hold one of these values
REFUSED: dict[str, tuple] = {
    # OpenAI
    "suffix": (None,),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "prediction": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    # vLLM extensions
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    "prompt_logprobs": (None,),
    "bad_words": (None, []),
    "truncate_prompt_tokens": (None,),
    "spaces_between_special_tokens": (None, True),
    "logits_processors": (None, []),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "guided_decoding_backend": (None,),
    "structured_outputs": (None,),
    "return_token_ids": (None, False),
    "prompt_embeds": (None,),
    "add_special_tokens": (None, True),  # completions (vLLM's default)
    "add_generation_prompt": (None, True),  # chat
    "continue_final_message": (None, False),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "documents": (None,),
    "mm_processor_kwargs": (None,),
}


def refuse_unsupported(req: s._Request, chat: bool) -> None:
    """400 naming every parameter set that this server cannot honour."""
    fields = {**(req.model_extra or {}), **{k: getattr(req, k) for k in type(req).model_fields}}
    bad = [name for name, ok in REFUSED.items() if name in fields and fields[name] not in ok]
    if chat and fields.get("echo") not in (None, False):
        bad.append("echo (on chat completions)")
    fmt = getattr(req, "response_format", None)
    if fmt and fmt.get("type", "text") != "text":
        bad.append("response_format")
    if bad:
        raise InvalidRequest(f"not supported by this server: {', '.join(bad)} (leave them unset)")


@dataclass(frozen=True, slots=True)
class Output:
    """How a request's completions become text and logprobs (the API side of the settings).

    Attributes:
        stops: stop strings (the text is cut before the first one, or after it with
            `include_stop`); searched after the text of the first `min_tokens` tokens.
        stop_ids: the token ids that end a completion (not in its text unless `include_stop`).
        min_tokens: tokens before which nothing stops (the engine masks the stop ids).
        skip_special: leave special tokens out of the text.
        include_stop: keep the stop string (or the stop token's text) in the text.
        logprobs: None = no logprobs; k >= 0 = the chosen token's logprob and the top k.
        as_ids: token strings as 'token_id:<id>' (vLLM's return_tokens_as_token_ids).
    """

    stops: tuple[str, ...]
    stop_ids: frozenset[int]
    min_tokens: int
    skip_special: bool
    include_stop: bool
    logprobs: int | None
    as_ids: bool


def sampling(req: s._Request, max_tokens: int, eos: int, vocab: int, top: int | None) -> tuple[SamplingParams, Output]:
    """The engine's settings for `req` (token ids checked against the vocabulary here, so a
    stream's bad ids are a 400 before its status line) and how its output reads."""
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 16 or any(not x for x in stops):
        raise InvalidRequest("stop must be up to 16 non-empty strings")
    extra = list(dict.fromkeys(req.stop_token_ids or []))
    stop_ids = tuple(extra if req.ignore_eos else dict.fromkeys([eos, *extra]))
    bias = tuple((_bias_id(k), float(v)) for k, v in (req.logit_bias or {}).items())
    allowed = None if req.allowed_token_ids is None else tuple(dict.fromkeys(req.allowed_token_ids))
    bad = [t for t in (*stop_ids, *(t for t, _ in bias), *(allowed or ())) if t >= vocab]
    if bad:
        raise BadTokens(f"token id {bad[0]} (stop_token_ids / logit_bias / allowed_token_ids) is outside "
                        f"the vocabulary ({vocab})")
    if req.min_tokens > max_tokens:
        raise InvalidRequest(f"min_tokens ({req.min_tokens}) exceeds max_tokens ({max_tokens})")
    params = SamplingParams(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
        stop_strings=tuple(stops), stop_token_ids=stop_ids, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty, logit_bias=bias,
        allowed_token_ids=allowed, min_p=req.min_p, min_tokens=req.min_tokens, top_logprobs=top or 0,
    )
    out = Output(tuple(stops), frozenset(stop_ids), req.min_tokens, req.skip_special_tokens,
                 req.include_stop_str_in_output, top, req.return_tokens_as_token_ids)
    return params, out


def _bias_id(key: str) -> int:
    try:
        value = int(key)
    except ValueError:
        raise InvalidRequest(f"logit_bias keys must be token ids, got {key!r}") from None
    if value < 0:
        raise BadTokens(f"logit_bias token id {value} is negative")
    return value


def max_tokens(req: s._Request, default: int) -> tuple[int, int]:
    """(tokens the caller asked for, tokens the engine generates): `max_tokens: 0` with `echo`
    scores the prompt alone (vLLM's and lm-eval's use); the engine generates one token, dropped."""
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    asked = default if asked is None else asked
    if asked == 0 and not (getattr(req, "echo", False) is True and not req.stream):
        raise InvalidRequest("max_tokens must be >= 1 (0 only with echo, not streamed: the prompt's logprobs alone)")
    return asked, max(asked, 1)


def completion_logprobs(req: s.CompletionRequest) -> int | None:
    return req.logprobs


def chat_logprobs(req: s.ChatCompletionRequest) -> int | None:
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true")
    return (req.top_logprobs or 0) if req.logprobs else None


def candidates(req: s.CompletionRequest) -> int:
    """Rows to sample per prompt: best_of (>= n; the n with the highest cumulative logprob are
    returned), or n."""
    best_of = req.best_of or req.n
    if best_of < req.n:
        raise InvalidRequest(f"best_of ({best_of}) must be >= n ({req.n})")
    if req.stream and best_of > req.n:
        raise InvalidRequest("best_of > n cannot be streamed")
    if req.echo and req.stream and req.logprobs is not None:
        raise InvalidRequest("echo with logprobs cannot be streamed")
    return best_of
