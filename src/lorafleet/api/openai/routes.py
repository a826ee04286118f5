"""/v1 routes: completions, chat completions (with SSE streaming), models. Thin handlers."""

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
from lorafleet.api.openai import logprobs as lp
from lorafleet.api.openai import schemas as s
from lorafleet.api.openai.params import (
    Output, candidates, chat_logprobs, completion_logprobs, refuse_unsupported, sampling,
)
from lorafleet.api.openai.params import max_tokens as max_tokens_of
from lorafleet.api.openai.service import OpenAIService, Target
from lorafleet.api.openai.text import IncrementalText, final_text
from lorafleet.api.tinker.catalog_bridge import policy_name
from lorafleet.catalog.records import Principal
from lorafleet.engine.types import SampledSequence, SampleResult, SamplingParams
from lorafleet.errors import InvalidRequest, LorafleetError

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(refuse_nul_params)])
DEFAULT_MAX_TOKENS = 16


def get_service(request: Request) -> OpenAIService:
    return request.app.state.openai


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


def _usage(prompts: list[list[int]], completion_tokens: int) -> s.Usage:
    p = sum(len(x) for x in prompts)
    return s.Usage(prompt_tokens=p, completion_tokens=completion_tokens, total_tokens=p + completion_tokens)


def _generated(results: list[SampleResult]) -> int:
    """Tokens generated, every candidate counted (best_of ones not returned too)."""
    return sum(len(q.tokens) for r in results for q in r.sequences)


def _best(seqs: list[SampledSequence], n: int) -> list[SampledSequence]:
    """best_of: the n candidates with the highest cumulative (raw) logprob, best first."""
    if len(seqs) == n:
        return seqs
    return sorted(seqs, key=lambda q: sum(q.logprobs), reverse=True)[:n]


def _setup(svc: OpenAIService, req: s._Request, target: Target, max_tokens: int, top: int | None):
    eos, vocab = svc.vocab(target)
    return sampling(req, max_tokens, eos, vocab, top)


@router.post("/completions", response_model=None)
async def completions(req: s.CompletionRequest, who: Principal = Depends(get_tenant),
                      svc: OpenAIService = Depends(get_service)):
    refuse_unsupported(req, chat=False)
    rows = candidates(req)
    asked, max_tokens = max_tokens_of(req, DEFAULT_MAX_TOKENS)
    target = svc.resolve(req.model, who)  # once: the request runs on this revision
    params, out = _setup(svc, req, target, max_tokens, completion_logprobs(req))
    tokenizer = svc.tokenizer(target)
    texts = [req.prompt] if isinstance(req.prompt, str) else [x for x in req.prompt if isinstance(x, str)]
    svc.check_prompt_chars(target, max(map(len, texts), default=0))
    prompts = await svc.tokenize(_completion_prompts, tokenizer, req.prompt)
    _check_context(svc, target, prompts, max_tokens)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echoes = [_echo_text(tokenizer, p, texts[i] if len(texts) == len(prompts) else None, out) if req.echo else ""
              for i, p in enumerate(prompts)]
    if req.stream:
        def chunk(i: int, delta: str | None, reason: str | None, entries: list[lp.Entry], offset: int) -> dict:
            logprobs = lp.completion(tokenizer, entries, out.logprobs, out.as_ids, offset) \
                if out.logprobs is not None and entries else None
            return s.Completion(id=rid, created=created, model=req.model, choices=[s.CompletionChoice(
                index=i, text=delta or "", finish_reason=reason, logprobs=logprobs)]).model_dump(exclude_none=True)
        return await _sse(svc, target, prompts, params, out, req, req.n, chunk, echoes)
    scoring = out.logprobs if req.echo and out.logprobs is not None else None
    results = await svc.sample(target, prompts, params, rows, prompt_logprobs=scoring)
    if asked == 0:  # echo alone: the one token the engine generated is not part of the answer
        results = [SampleResult([SampledSequence([], [], "length", top_logprobs=[]) for _ in r.sequences],
                                r.prompt_logprobs, r.topk_prompt_logprobs) for r in results]
    choices = []
    for pi, res in enumerate(results):
        for k, seq in enumerate(_best(res.sequences, req.n)):
            text, reason = final_text(tokenizer, seq.tokens, seq.stop_reason, out)
            logprobs = None
            if out.logprobs is not None:
                entries = lp.sequence_entries(seq)
                if req.echo:
                    entries = lp.prompt_entries(prompts[pi], res.prompt_logprobs, res.topk_prompt_logprobs) + entries
                logprobs = lp.completion(tokenizer, entries, out.logprobs, out.as_ids)
            choices.append(s.CompletionChoice(index=pi * req.n + k, text=echoes[pi] + text, finish_reason=reason,
                                              logprobs=logprobs))
    return s.Completion(id=rid, created=created, model=req.model, choices=choices,
                        usage=_usage(prompts, _generated(results)))


def _echo_text(tokenizer, prompt: list[int], text: str | None, out) -> str:
    """The prompt as echoed: the string given, or its token ids decoded."""
    return text if text is not None else tokenizer.decode(prompt, skip_special_tokens=out.skip_special)


@router.post("/chat/completions", response_model=None)
async def chat_completions(req: s.ChatCompletionRequest, who: Principal = Depends(get_tenant),
                           svc: OpenAIService = Depends(get_service)):
    refuse_unsupported(req, chat=True)
    _, max_tokens = max_tokens_of(req, DEFAULT_MAX_TOKENS)
    target = svc.resolve(req.model, who)  # once: the request runs on this revision
    params, out = _setup(svc, req, target, max_tokens, chat_logprobs(req))
    tokenizer = svc.tokenizer(target)
    svc.check_prompt_chars(target, sum(_chars(m.content) for m in req.messages))
    prompt = await svc.tokenize(_chat_prompt, tokenizer, req.messages)
    _check_context(svc, target, [prompt], max_tokens)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        def chunk(i: int, delta: str | None, reason: str | None, entries: list[lp.Entry], offset: int) -> dict:
            d = {} if delta is None else {"content": delta}
            if delta is not None and reason is None and i >= 0:
                d.setdefault("role", "assistant")
            choice = {"index": i, "delta": d, "finish_reason": reason}
            if out.logprobs is not None and entries:
                choice["logprobs"] = lp.chat(tokenizer, entries, out.logprobs, out.as_ids).model_dump()
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [choice]}
        return await _sse(svc, target, [prompt], params, out, req, req.n, chunk)
    (res,) = await svc.sample(target, [prompt], params, req.n)
    choices = []
    for k, seq in enumerate(res.sequences):
        text, reason = final_text(tokenizer, seq.tokens, seq.stop_reason, out)
        logprobs = None
        if out.logprobs is not None:
            logprobs = lp.chat(tokenizer, lp.sequence_entries(seq), out.logprobs, out.as_ids)
        choices.append(s.ChatChoice(index=k, message=s.AssistantMessage(content=text), finish_reason=reason,
                                    logprobs=logprobs))
    return s.ChatCompletion(id=rid, created=created, model=req.model, choices=choices,
                            usage=_usage([prompt], _generated([res])))


async def _sse(svc: OpenAIService, target: Target, prompts, params: SamplingParams, out: Output, req: s._Request,
               n: int, make_chunk, echoes: list[str] | None = None) -> StreamingResponse:
    """Stream token deltas as server-sent events; one choice index per (prompt, sample).

    Admission (cold load, host hold, serving queue) happens before the response starts, so a
    full queue is a real 429 + Retry-After for a stream too. Errors after that are reported
    in-stream. A client that closes the stream cancels the job: its rows stop. With logprobs,
    a chunk carries the entries of the tokens its text came from (a token whose text is held
    back, a stop string's prefix or half a character, rides with the next chunk). With
    `stream_options.include_usage`, a last chunk with no choices carries the usage; with
    `continuous_usage_stats` too, every chunk carries its choice's usage so far (vLLM's).
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    tokenizer = svc.tokenizer(target)
    rows = len(prompts) * n
    texts = {i: IncrementalText(tokenizer, out) for i in range(rows)}
    pending: dict[int, list[lp.Entry]] = {i: [] for i in range(rows)}
    offsets = dict.fromkeys(range(rows), 0)
    generated = dict.fromkeys(range(rows), 0)

    def on_token(req_i: int, sample_k: int, token: int, logprob: float, top) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (req_i * n + sample_k, lp.Entry(token, logprob, top)))

    admitted = await svc.submit(target, prompts, params, n, on_token)
    usage = req.stream_options is not None and req.stream_options.include_usage
    continuous = usage and req.stream_options.continuous_usage_stats  # type: ignore[union-attr]

    def chunk_of(i: int, delta: str | None, reason: str | None, entries: list[lp.Entry]) -> bytes:
        chunk = make_chunk(i, delta, reason, entries, offsets[i])
        if continuous:
            chunk["usage"] = _usage([prompts[i // n]], generated[i]).model_dump()
        return _event(chunk)

    async def run() -> None:
        try:
            await queue.put(("done", await svc.result(admitted)))
        except Exception as e:  # reported in-stream: the status line is already sent
            await queue.put(("error", e))

    def emit(i: int, delta: str | None, reason: str | None) -> bytes:
        entries, pending[i] = pending[i], []
        event = chunk_of(i, delta, reason, entries)
        offsets[i] += sum(len(lp.token_str(tokenizer, e.token, out.as_ids)) for e in entries)
        return event

    async def events() -> AsyncIterator[bytes]:
        task = asyncio.create_task(run())
        try:
            for i in range(rows) if echoes else ():
                if echoes[i // n]:
                    yield chunk_of(i, echoes[i // n], None, [])
            while True:
                item = await queue.get()
                if item[0] == "done":
                    for pi, res in enumerate(item[1]):
                        for k, seq in enumerate(res.sequences):
                            i = pi * n + k
                            tail = texts[i].finish()
                            reason = "stop" if texts[i].stopped or seq.stop_reason == "stop" else "length"
                            if tail or pending[i]:
                                yield emit(i, tail, None)
                            yield chunk_of(i, None, reason, [])
                    if usage:  # the chunks' envelope, no choices, and the usage
                        last = make_chunk(0, None, None, [], 0)
                        last["choices"], last["usage"] = [], _usage(prompts, _generated(item[1])).model_dump()
                        yield _event(last)
                    break
                if item[0] == "error":
                    exc = item[1]
                    ours = isinstance(exc, LorafleetError)
                    message = client_message(exc, "completion stream")  # no internal text
                    yield _event(error_body(message, type(exc).__name__ if ours else "InternalError",
                                            status_for(exc) if ours else 500, "/v1/"))
                    break
                i, entry = item
                if texts[i].done:
                    continue
                pending[i].append(entry)
                generated[i] += 1
                delta = texts[i].push(entry.token)
                if delta:
                    yield emit(i, delta, None)
            yield b"data: [DONE]\n\n"
        finally:  # also when the client went away: cancelling the wait cancels the job
            task.cancel()
            admitted.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


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
