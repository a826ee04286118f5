"""/v1 routes: completions, chat completions (with SSE streaming), models. Thin handlers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from lorafleet.api.auth import get_tenant
from lorafleet.api.checks import refuse_nul_params
from lorafleet.api.errors import body as error_body
from lorafleet.api.errors import client_message, status_for
from lorafleet.api.openai import schemas as s
from lorafleet.api.openai import tools as tooling
from lorafleet.api.openai.service import OpenAIService, Target
from lorafleet.api.openai.structured import grammar_spec
from lorafleet.api.openai.text import IncrementalText, truncate_at_stop
from lorafleet.api.tinker.catalog_bridge import policy_name
from lorafleet.catalog.records import Principal
from lorafleet.engine.types import SampleResult, SamplingParams
from lorafleet.errors import InvalidRequest, LorafleetError

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(refuse_nul_params)])
DEFAULT_MAX_TOKENS = 16


def get_service(request: Request) -> OpenAIService:
    return request.app.state.openai


def _refuse_unsupported(req: s._Request) -> None:
    bad = [name for name, ok in (
        ("presence_penalty", req.presence_penalty == 0),
        ("frequency_penalty", req.frequency_penalty == 0),
        ("logit_bias", not req.logit_bias),
        ("best_of", getattr(req, "best_of", None) in (None, 1, req.n)),
        ("echo", not getattr(req, "echo", False)),
        ("suffix", getattr(req, "suffix", None) is None),
        ("tools", isinstance(req, s.ChatCompletionRequest) or not getattr(req, "tools", None)),
    ) if not ok]
    if bad:
        raise InvalidRequest(f"not supported by this server: {', '.join(bad)} (leave them unset)")


def _params(req: s._Request, max_tokens: int) -> SamplingParams:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 16 or any(not x for x in stops):
        raise InvalidRequest("stop must be up to 16 non-empty strings")
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                          top_k=req.top_k, seed=req.seed, stop_strings=tuple(stops))


MAX_PROMPTS = 64  # prompts in one /v1/completions request (each x n choices)


def _completion_prompts(tokenizer, prompt) -> list[list[int]]:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and len(prompt) > MAX_PROMPTS:
        # before tokenizing: a long list of strings costs time even when it will be refused
        raise InvalidRequest(f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}")
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif prompt and all(isinstance(x, int) for x in prompt):
        prompts = [list(prompt)]
    elif prompt and all(isinstance(x, str) for x in prompt):
        prompts = [tokenizer.encode(x) for x in prompt]
    elif prompt and all(isinstance(x, list) for x in prompt):
        prompts = [list(x) for x in prompt]
    else:
        raise InvalidRequest("prompt must be a string, a list of strings, or token ids")
    if any(not p for p in prompts):
        raise InvalidRequest("prompt is empty")
    return prompts


def _chars(content: str | list[s.ContentPart] | None) -> int:
    if isinstance(content, list):
        return sum(len(part.text or "") for part in content)
    return len(content or "")


def _chat_prompt(tokenizer, messages: list[s.ChatMessage], tools: tooling.ToolPlan | None = None) -> list[int]:
    convo = tooling.messages_for_template(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this base model has no chat template: use /v1/completions")
    extra = {} if tools is None else {"tools": tools.tools}
    ids = tokenizer.apply_chat_template(convo, add_generation_prompt=True, return_dict=False, **extra)
    return list(ids)


async def _constrained(svc: OpenAIService, target: Target, params: SamplingParams, spec) -> SamplingParams:
    """The params with the request's grammar compiled for the target's base (a worker thread)."""
    if spec is None:
        return params
    return dataclasses.replace(params, grammar=await svc.compile_grammar(target, spec))


def _tool_calls(calls: list[dict]) -> list[s.ToolCall] | None:
    return [s.ToolCall.model_validate(c) for c in calls] or None


def _check_context(svc: OpenAIService, target: Target, prompts: list[list[int]], max_tokens: int) -> None:
    for p in prompts:
        svc.check_context(target, len(p), max_tokens)


def _finish(tokenizer, tokens: list[int], reason: str, stops: list[str]) -> tuple[str, str]:
    text, hit = truncate_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stops)
    return text, "stop" if hit else reason


def _usage(prompts: list[list[int]], results: list[SampleResult]) -> s.Usage:
    p = sum(len(x) for x in prompts)
    c = sum(len(q.tokens) for r in results for q in r.sequences)
    return s.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _piece(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


@router.post("/completions", response_model=None)
async def completions(req: s.CompletionRequest, who: Principal = Depends(get_tenant),
                      svc: OpenAIService = Depends(get_service)):
    _refuse_unsupported(req)
    max_tokens = req.max_tokens or DEFAULT_MAX_TOKENS
    params = _params(req, max_tokens)
    spec = grammar_spec(req)
    target = svc.resolve(req.model, who)  # once: the request runs on this revision
    tokenizer = svc.tokenizer(target)
    params = await _constrained(svc, target, params, spec)
    texts = [req.prompt] if isinstance(req.prompt, str) else [x for x in req.prompt if isinstance(x, str)]
    svc.check_prompt_chars(target, max(map(len, texts), default=0))
    prompts = await svc.tokenize(_completion_prompts, tokenizer, req.prompt)
    _check_context(svc, target, prompts, max_tokens)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    stops = list(params.stop_strings)
    if req.stream:
        return await _sse(svc, target, prompts, params, req.n, lambda i, delta, reason: s.Completion(
            id=rid, created=created, model=req.model,
            choices=[s.CompletionChoice(index=i, text=delta or "", finish_reason=reason)]).model_dump(exclude_none=True))
    results = await svc.sample(target, prompts, params, req.n)
    choices = []
    for pi, res in enumerate(results):
        for k, seq in enumerate(res.sequences):
            text, reason = _finish(tokenizer, seq.tokens, seq.stop_reason, stops)
            lp = None
            if req.logprobs is not None:
                pieces = [_piece(tokenizer, t) for t in seq.tokens]
                offsets = [sum(len(x) for x in pieces[:j]) for j in range(len(pieces))]
                lp = s.CompletionLogprobs(
                    tokens=pieces, token_logprobs=seq.logprobs, text_offset=offsets,
                    top_logprobs=[{p: v} for p, v in zip(pieces, seq.logprobs)] if req.logprobs else None)
            choices.append(s.CompletionChoice(index=pi * req.n + k, text=text, finish_reason=reason, logprobs=lp))
    return s.Completion(id=rid, created=created, model=req.model, choices=choices, usage=_usage(prompts, results))


@router.post("/chat/completions", response_model=None)
async def chat_completions(req: s.ChatCompletionRequest, who: Principal = Depends(get_tenant),
                           svc: OpenAIService = Depends(get_service)):
    _refuse_unsupported(req)
    max_tokens = req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS
    params = _params(req, max_tokens)
    spec = grammar_spec(req)
    target = svc.resolve(req.model, who)  # once: the request runs on this revision
    tokenizer = svc.tokenizer(target)
    tools = tooling.plan(tokenizer, target.base, req.tools, req.tool_choice, req.parallel_tool_calls)
    if tools is not None and tools.grammar is not None:
        if spec is not None:
            raise InvalidRequest("tool_choice required / a named function cannot be combined with a "
                                 "structured output constraint (response_format, guided_*)")
        spec = tools.grammar
    params = await _constrained(svc, target, params, spec)
    svc.check_prompt_chars(target, sum(_chars(m.content) for m in req.messages))
    prompt = await svc.tokenize(_chat_prompt, tokenizer, req.messages, tools)
    _check_context(svc, target, [prompt], max_tokens)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    stops = list(params.stop_strings)
    if req.stream:
        def chunk(i: int, delta: str | None, reason: str | None, calls: list[dict] | None = None) -> dict:
            d: dict = {} if delta is None else {"content": delta}
            if calls:
                d = {"role": "assistant", "content": None,
                     "tool_calls": [{"index": j, **c} for j, c in enumerate(calls)]}
            if delta is not None and reason is None and i >= 0:
                d.setdefault("role", "assistant")
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [{"index": i, "delta": d, "finish_reason": reason}]}
        return await _sse(svc, target, [prompt], params, req.n, chunk,
                          parse_calls=tools is not None and tools.parse)
    (res,) = await svc.sample(target, [prompt], params, req.n)
    choices = []
    for k, seq in enumerate(res.sequences):
        text, reason = _finish(tokenizer, seq.tokens, seq.stop_reason, stops)
        said, calls = tooling.parse_calls(text) if tools is not None and tools.parse else (text, [])
        if calls:
            reason = "tool_calls"
        lp = None
        if req.logprobs:
            content = []
            for t, v in zip(seq.tokens, seq.logprobs):
                piece = _piece(tokenizer, t)
                top = [{"token": piece, "logprob": v, "bytes": list(piece.encode())}] if req.top_logprobs else []
                content.append(s.TokenLogprob(token=piece, logprob=v, bytes=list(piece.encode()), top_logprobs=top))
            lp = s.ChoiceLogprobs(content=content)
        message = s.AssistantMessage(content=said, tool_calls=_tool_calls(calls))
        choices.append(s.ChatChoice(index=k, message=message, finish_reason=reason, logprobs=lp))
    return s.ChatCompletion(id=rid, created=created, model=req.model, choices=choices, usage=_usage([prompt], [res]))


async def _sse(svc: OpenAIService, target: Target, prompts, params: SamplingParams, n: int,
               make_chunk: Callable[..., dict], parse_calls: bool = False) -> StreamingResponse:
    """Stream token deltas as server-sent events; one choice index per (prompt, sample).

    With `parse_calls`, text streams until a tool-call block begins; the calls come in one
    delta at the end (then finish_reason "tool_calls"), with any content after them.

    Admission (cold load, host hold, serving queue) happens before the response starts, so a
    full queue is a real 429 + Retry-After for a stream too. Errors after that are reported
    in-stream. A client that closes the stream cancels the job: its rows stop.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    tokenizer = svc.tokenizer(target)
    stops = list(params.stop_strings)
    held = [tooling.OPEN] if parse_calls else []  # a call block is held back until it can be parsed
    texts = {i: IncrementalText(tokenizer, stops + held) for i in range(len(prompts) * n)}

    def on_token(req_i: int, sample_k: int, token: int, logprob: float) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (req_i * n + sample_k, token))

    admitted = await svc.submit(target, prompts, params, n, on_token)

    async def run() -> None:
        try:
            await queue.put(("done", await svc.result(admitted)))
        except Exception as e:  # reported in-stream: the status line is already sent
            await queue.put(("error", e))

    async def events() -> AsyncIterator[bytes]:
        task = asyncio.create_task(run())
        try:
            while True:
                item = await queue.get()
                if item[0] == "done":
                    for pi, res in enumerate(item[1]):
                        for k, seq in enumerate(res.sequences):
                            i = pi * n + k
                            tail = texts[i].finish()
                            reason = "stop" if texts[i].stopped else seq.stop_reason
                            if parse_calls:
                                tail, calls, reason = _stream_calls(tokenizer, seq, stops, texts[i], tail)
                                if calls:
                                    yield _event(make_chunk(i, None, None, calls))
                            if tail:
                                yield _event(make_chunk(i, tail, None))
                            yield _event(make_chunk(i, None, reason))
                    break
                if item[0] == "error":
                    exc = item[1]
                    ours = isinstance(exc, LorafleetError)
                    message = client_message(exc, "completion stream")  # no internal text
                    yield _event(error_body(message, type(exc).__name__ if ours else "InternalError",
                                            status_for(exc) if ours else 500, "/v1/"))
                    break
                i, token = item
                delta = texts[i].push(token)
                if delta:
                    yield _event(make_chunk(i, delta, None))
            yield b"data: [DONE]\n\n"
        finally:  # also when the client went away: cancelling the wait cancels the job
            task.cancel()
            admitted.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _stream_calls(tokenizer, seq, stops: list[str], text: IncrementalText, tail: str):
    """At the end of a streamed choice with tools: (content not sent yet, calls, finish reason)."""
    full, hit = truncate_at_stop(tokenizer.decode(seq.tokens, skip_special_tokens=True), stops)
    before, calls, after = tooling.split_calls(full)
    sent = text.sent - len(tail)  # characters delivered before this final tail
    rest = before[sent:] + after if calls else full[sent:]
    reason = "tool_calls" if calls else ("stop" if hit else seq.stop_reason)
    return rest, calls, reason


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


@router.get("/models", response_model=s.ModelList)
async def models(runs: bool = True, who: Principal = Depends(get_tenant),
                 svc: OpenAIService = Depends(get_service)) -> s.ModelList:
    """The bases and the caller's adapters; `?runs=false` leaves out Tinker training runs that
    still have their automatic private `tinker-...` name (named or published runs stay)."""
    now = int(time.time())
    cards = [s.ModelCard(id=b, created=now, owned_by="lorafleet") for b in sorted(svc.runners)]
    page = svc.catalog.list_policies(who, owner=who.tenant, limit=500)
    for p in page.items:
        if p.base_model in svc.runners and (runs or not is_unnamed_run(p)):
            cards.append(_card(p.full_name, p))
    return s.ModelList(data=cards)


@router.get("/models/{model:path}", response_model=s.ModelCard)
async def retrieve_model(model: str, who: Principal = Depends(get_tenant),
                         svc: OpenAIService = Depends(get_service)) -> s.ModelCard:
    """One model: a base, or any adapter reference `model` accepts (`owner/name:alias`, ...)."""
    def card() -> s.ModelCard:
        target = svc.resolve(model, who)
        if target.revision_id is None:
            return s.ModelCard(id=model, created=int(time.time()), owned_by="lorafleet")
        revision = svc.catalog.resolve(target.revision_id, who)
        return _card(model, svc.catalog.get_policy(who, revision.policy), int(revision.created_at.timestamp()))

    return await asyncio.to_thread(card)  # catalog reads stay off the event loop


def _card(model_id: str, p, created: int | None = None) -> s.ModelCard:
    return s.ModelCard(id=model_id, created=created or int(p.created_at.timestamp()), owned_by=p.owner,
                       root=p.base_model, parent=p.base_model)


def is_unnamed_run(p) -> bool:
    return bool(p.tinker_run_id) and not p.public and p.full_name == policy_name(p.owner, p.tinker_run_id)
