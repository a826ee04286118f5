"""Population voting: `POST /v1/population/completions` and `/v1/population/chat/completions`.

A request names a population of adapters on one base (a list of `model` strings, or a catalog
`selector`: `owner/name` with `*` / `?` wildcards in the name, optionally only the revisions an
alias - the catalog's tag - points at, optionally filtered by policy metadata) and `k`.
Every chosen adapter answers the same prompt once; the k sample jobs are queued together
(`Scheduler.submit_all`), so they are admitted into the same decode step and decode as one
mixed batch, each row through its own adapter slot. Each completion's answer is extracted
(voting.py) and the majority is returned with the vote counts and every adapter's answer.

The population, in order: the `adapters` list as given, or the selector's matches in catalog
creation order; `k` takes its first k members (default: all; more than there are is a 400).
Sampling defaults to greedy (`temperature` 0), so the population's diversity comes from its
weights; a `seed` with `temperature` > 0 gives every member the same random stream.
"""

from __future__ import annotations

import asyncio
import fnmatch
import time
import uuid
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from lorafleet.api.auth import get_tenant
from lorafleet.api.checks import Checked, refuse_nul_params
from lorafleet.api.openai import schemas as s
from lorafleet.api.openai.routes import _chat_prompt
from lorafleet.api.openai.text import truncate_at_stop
from lorafleet.api.openai.service import OpenAIService, Reply, Target, own_ref
from lorafleet.api.openai.voting import Extractor, Vote, compile_extractor, tally
from lorafleet.catalog.records import Principal
from lorafleet.catalog.refs import parse_policy_name
from lorafleet.catalog.validate import MAX_PAGE
from lorafleet.engine.jobs import Job, Sample, WorkKind
from lorafleet.engine.types import SampleRequest, SampleResult, SamplingParams
from lorafleet.errors import InvalidRequest, NotFound

router = APIRouter(prefix="/v1/population", tags=["population"], dependencies=[Depends(refuse_nul_params)])
MAX_POPULATION = 128  # adapters in one vote
MAX_SCANNED = 10 * MAX_PAGE  # catalog policies a selector looks through


class Extract(Checked):
    model_config = ConfigDict(extra="forbid")

    regex: str | None = Field(default=None, max_length=512)
    group: int | str | None = None
    json_field: str | None = Field(default=None, max_length=256)
    match: Literal["first", "last"] = "first"


class Selector(Checked):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=200)  # owner/pattern: `*` and `?` in the name part only
    alias: str | None = Field(default=None, max_length=64)  # only revisions this alias (tag) names
    metadata: dict[str, str] | None = None  # policy metadata that must match


class _PopulationRequest(Checked):
    model_config = ConfigDict(extra="forbid")

    adapters: list[str] | None = Field(default=None, min_length=1, max_length=MAX_POPULATION)
    selector: Selector | None = None
    k: int | None = Field(default=None, ge=1, le=MAX_POPULATION)
    extract: Extract
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1, lt=1 << 31)
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 63)
    stop: str | list[str] | None = None
    user: str | None = None


class PopulationCompletionRequest(_PopulationRequest):
    prompt: str | list[s.TokenId]


class PopulationChatRequest(_PopulationRequest):
    messages: list[s.ChatMessage] = Field(min_length=1)


class Voter(BaseModel):
    index: int
    model: str  # as the request named it (a selector: owner/name, or owner/name:alias)
    revision_id: str | None  # None: the base model itself
    text: str
    answer: str | None  # None: abstained (nothing extracted)
    finish_reason: Literal["stop", "length"] | None


class PopulationCompletion(BaseModel):
    id: str
    object: Literal["population.completion"] = "population.completion"
    created: int
    model: str  # the base every member runs on
    k: int
    answer: str | None  # the majority answer; None when every member abstained
    votes: dict[str, int]  # answer -> votes, most first
    tied: list[str]  # the answers that shared the top count (empty: no tie)
    abstained: int
    choices: list[Voter]
    usage: s.Usage


def get_service(request: Request) -> OpenAIService:
    return request.app.state.openai


# ---- the population --------------------------------------------------------------------


def population(svc: OpenAIService, who: Principal, req: _PopulationRequest) -> list[Target]:
    """The chosen members, resolved once (blocking: catalog reads). 404 for a member the
    caller cannot see, 400 for a mixed-base or duplicated population or k over its size."""
    if (req.adapters is None) == (req.selector is None):
        raise InvalidRequest("name the population with exactly one of 'adapters' and 'selector'")
    if req.adapters is not None:
        if len(set(req.adapters)) < len(req.adapters):
            raise InvalidRequest("adapters lists a model more than once")
        want = req.k or len(req.adapters)
        if want > len(req.adapters):
            raise InvalidRequest(f"k={want} is larger than the population ({len(req.adapters)} adapters)")
        targets = [svc.resolve(m, who) for m in req.adapters[:want]]
    else:
        targets = _select(svc, who, req.selector, req.k)  # type: ignore[arg-type]
    seen: dict[tuple[str, str | None], str] = {}
    for t in targets:
        key = (t.base, t.revision_id)
        if key in seen:
            raise InvalidRequest(f"{seen[key]} and {t.model} are the same revision: each member votes once")
        seen[key] = t.model
    bases = sorted({t.base for t in targets})
    if len(bases) > 1:
        raise InvalidRequest(f"a population runs in one batch on one base; these adapters span {bases}")
    return targets


def _select(svc: OpenAIService, who: Principal, sel: Selector, k: int | None) -> list[Target]:
    owner, pattern = _split(sel.name, who)
    literal = max(pattern.replace("?", "*").split("*"), key=len)
    found: list[Target] = []
    cursor, scanned = None, 0
    while True:
        page = svc.catalog.list_policies(who, owner=owner, metadata=sel.metadata, query=literal or None,
                                         limit=MAX_PAGE, cursor=cursor)
        for p in page.items:
            if p.base_model not in svc.runners or not fnmatch.fnmatchcase(p.name, pattern):
                continue
            ref = p.full_name if sel.alias is None else f"{p.full_name}:{sel.alias}"
            try:
                found.append(svc.resolve(ref, who))
            except NotFound:  # no such alias on this policy (or no revision yet): not a member
                continue
            if len(found) > (k or MAX_POPULATION):
                break
        scanned += len(page.items)
        if page.next_cursor is None or len(found) > (k or MAX_POPULATION) or scanned >= MAX_SCANNED:
            break
        cursor = page.next_cursor
    what = f"selector {sel.name!r}" + (f" with alias {sel.alias!r}" if sel.alias else "")
    if not found:
        raise NotFound(f"{what} matches no adapter you can use on a served base")
    if k is None and len(found) > MAX_POPULATION:
        raise InvalidRequest(f"{what} matches more than {MAX_POPULATION} adapters: set k or narrow it")
    if k is not None and k > len(found):
        raise InvalidRequest(f"k={k} is larger than the population ({what} matches {len(found)} adapters)")
    return found[: k or len(found)]


def _split(name: str, who: Principal) -> tuple[str, str]:
    full = own_ref(name, who)
    owner, _, pattern = full.partition("/")
    if not pattern or any(c in owner for c in "*?["):
        raise InvalidRequest(f"selector.name {name!r} must be owner/pattern, wildcards (* ?) in the name only")
    parse_policy_name(f"{owner}/{pattern.replace('*', 'x').replace('?', 'x')}")  # the name's characters
    return owner, pattern


# ---- one mixed batch ---------------------------------------------------------------------


async def sample_together(svc: OpenAIService, targets: list[Target], prompt: list[int],
                          params: SamplingParams) -> list[SampleResult]:
    """One answer per member, all queued at once on the base's scheduler (one mixed batch).

    Leases first (cold loads run together, shared with other requests); a full queue is a 429
    before anything is queued; a client that leaves cancels every member's job."""
    runner = svc.runners[targets[0].base]
    got = await asyncio.gather(*(svc.acquire(t) for t in targets), return_exceptions=True)
    leases = [x for x in got if x is not None and not isinstance(x, BaseException)]
    failed = [x for x in got if isinstance(x, BaseException)]
    if failed:
        for lease in leases:
            lease.release()
        raise failed[0]
    jobs = [Job(WorkKind.SAMPLE, Sample([SampleRequest(None, prompt, 1, params)], lease), Reply())
            for lease in got]
    try:
        runner.submit_all(jobs)
    except BaseException:
        for lease in leases:
            lease.release()
        raise
    try:
        results = await asyncio.gather(*(asyncio.wrap_future(j.sink.future) for j in jobs))  # type: ignore[attr-defined]
    except BaseException:
        for j in jobs:
            j.cancel()
        raise
    m = svc.metrics
    m.tokens.labels("prompt").inc(len(prompt) * len(jobs))
    m.tokens.labels("completion").inc(sum(len(q.tokens) for r in results for q in r[0].sequences))
    return [r[0] for r in results]


async def _vote(svc: OpenAIService, who: Principal, req: _PopulationRequest, make_prompt) -> PopulationCompletion:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 16 or any(not x for x in stops):
        raise InvalidRequest("stop must be up to 16 non-empty strings")
    params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                            top_k=req.top_k, seed=req.seed, stop_strings=tuple(stops))

    def prepare() -> tuple[Extractor, list[Target], list[int]]:
        """One worker-thread hop for everything before decoding: probing the pattern, catalog
        reads, tokenizing (under the service's tokenizer lock)."""
        ex = compile_extractor(req.extract.regex, req.extract.group, req.extract.json_field, req.extract.match)
        targets = population(svc, who, req)
        prompt = make_prompt(svc.tokenizer(targets[0]), targets[0])
        svc.check_context(targets[0], len(prompt), req.max_tokens)
        return ex, targets, prompt

    extractor, targets, prompt = await asyncio.to_thread(prepare)
    tokenizer = svc.tokenizer(targets[0])
    results = await sample_together(svc, targets, prompt, params)

    def count() -> tuple[list[Voter], Vote]:  # detokenizing and regexes: off the event loop
        voters = []
        for i, (t, res) in enumerate(zip(targets, results)):
            seq = res.sequences[0]
            text, hit = truncate_at_stop(tokenizer.decode(seq.tokens, skip_special_tokens=True), stops)
            reason = "stop" if hit else seq.stop_reason
            voters.append(Voter(index=i, model=t.model, revision_id=t.revision_id, text=text,
                                answer=extractor(text), finish_reason=reason))
        return voters, tally([v.answer for v in voters])

    voters, vote = await asyncio.to_thread(count)
    completion = sum(len(r.sequences[0].tokens) for r in results)
    return PopulationCompletion(
        id=f"popcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=targets[0].base, k=len(targets),
        answer=vote.answer, votes=vote.votes, tied=vote.tied, abstained=vote.abstained,
        choices=voters, usage=s.Usage(prompt_tokens=len(prompt) * len(targets), completion_tokens=completion,
                                      total_tokens=len(prompt) * len(targets) + completion))


@router.post("/completions", response_model=PopulationCompletion)
async def population_completions(req: PopulationCompletionRequest, who: Principal = Depends(get_tenant),
                                 svc: OpenAIService = Depends(get_service)) -> PopulationCompletion:
    """Every member completes `prompt` once, in one mixed batch; the majority answer wins."""
    def prompt(tokenizer, target: Target) -> list[int]:
        if isinstance(req.prompt, list):
            ids = list(req.prompt)
        else:
            svc.check_prompt_chars(target, len(req.prompt))
            ids = svc.tokenize_now(tokenizer.encode, req.prompt)
        if not ids:
            raise InvalidRequest("prompt is empty")
        return ids

    return await _vote(svc, who, req, prompt)


@router.post("/chat/completions", response_model=PopulationCompletion)
async def population_chat(req: PopulationChatRequest, who: Principal = Depends(get_tenant),
                          svc: OpenAIService = Depends(get_service)) -> PopulationCompletion:
    """The chat form: `messages` through the base's chat template, then as completions."""
    def prompt(tokenizer, target: Target) -> list[int]:
        svc.check_prompt_chars(target, sum(len(m.content) if isinstance(m.content, str) else
                                           sum(len(p.text or "") for p in m.content or []) for m in req.messages))
        return svc.tokenize_now(_chat_prompt, tokenizer, req.messages)

    return await _vote(svc, who, req, prompt)
