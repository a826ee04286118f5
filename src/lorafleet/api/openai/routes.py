"""/v1 routes: completions and chat completions (with SSE streaming). Thin handlers; the model
routes are in models.py, population voting in population.py."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from lorafleet.api.auth import get_tenant
from lorafleet.api.checks import refuse_nul_params
from lorafleet.api.errors import body as error_body
from lorafleet.api.errors import client_message, status_for
from lorafleet.api.openai import schemas as s
from lorafleet.api.openai.service import OpenAIService, Target
from lorafleet.api.openai.text import IncrementalText, truncate_at_stop
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
        ("tools", not getattr(req, "tools", None)),
    ) if not ok]
    fmt = getattr(req, "response_format", None)
    if fmt and fmt.get("type", "text") != "text":
        bad.append("response_format")
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


def _chat_prompt(tokenizer, messages: list[s.ChatMessage]) -> list[int]:
    convo = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise InvalidRequest("only text content parts are supported")
            content = "".join(part.text or "" for part in content)
        convo.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this base model has no chat template: use /v1/completions")
    ids = tokenizer.apply_chat_template(convo, add_generation_prompt=True, return_dict=False)
    return list(ids)


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
    target = svc.resolve(req.model, who)  # once: the request runs on this revision
    tokenizer = svc.tokenizer(target)
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
    target = svc.resolve(req.model, who)  # once: the request runs on this revision
    tokenizer = svc.tokenizer(target)
    svc.check_prompt_chars(target, sum(_chars(m.content) for m in req.messages))
    prompt = await svc.tokenize(_chat_prompt, tokenizer, req.messages)
    _check_context(svc, target, [prompt], max_tokens)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    stops = list(params.stop_strings)
    if req.stream:
        def chunk(i: int, delta: str | None, reason: str | None) -> dict:
            d = {} if delta is None else {"content": delta}
            if delta is not None and reason is None and i >= 0:
                d.setdefault("role", "assistant")
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [{"index": i, "delta": d, "finish_reason": reason}]}
        return await _sse(svc, target, [prompt], params, req.n, chunk)
    (res,) = await svc.sample(target, [prompt], params, req.n)
    choices = []
    for k, seq in enumerate(res.sequences):
        text, reason = _finish(tokenizer, seq.tokens, seq.stop_reason, stops)
        lp = None
        if req.logprobs:
            content = []
            for t, v in zip(seq.tokens, seq.logprobs):
                piece = _piece(tokenizer, t)
                top = [{"token": piece, "logprob": v, "bytes": list(piece.encode())}] if req.top_logprobs else []
                content.append(s.TokenLogprob(token=piece, logprob=v, bytes=list(piece.encode()), top_logprobs=top))
            lp = s.ChoiceLogprobs(content=content)
        choices.append(s.ChatChoice(index=k, message=s.AssistantMessage(content=text), finish_reason=reason, logprobs=lp))
    return s.ChatCompletion(id=rid, created=created, model=req.model, choices=choices, usage=_usage([prompt], [res]))


async def _sse(svc: OpenAIService, target: Target, prompts, params: SamplingParams, n: int,
               make_chunk) -> StreamingResponse:
    """Stream token deltas as server-sent events; one choice index per (prompt, sample).

    Admission (cold load, host hold, serving queue) happens before the response starts, so a
    full queue is a real 429 + Retry-After for a stream too. Errors after that are reported
    in-stream. A client that closes the stream cancels the job: its rows stop.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    tokenizer = svc.tokenizer(target)
    texts = {i: IncrementalText(tokenizer, list(params.stop_strings)) for i in range(len(prompts) * n)}

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


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
