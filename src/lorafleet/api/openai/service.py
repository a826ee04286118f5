"""OpenAI-API use cases: resolve `model` to a base and revision, admit, sample, stream.

A request's adapter reference (`owner/name`, `owner/name:alias`, `owner/name@rev`,
`tinker://...`) resolves to one immutable revision at admission; the request then runs on
that revision even if the alias moves meanwhile. A cold revision is loaded by the residency
manager's cold loader while the request waits (without holding up resident work); a full load
queue answers 429 + Retry-After. Requests become typed sample jobs on the base's scheduler,
in the same fair queue as Tinker samples; their results come back through a `Reply` sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, TypeVar

from lorafleet.catalog.records import Principal
from lorafleet.catalog.refs import RefKind, parse_ref
from lorafleet.catalog.service import Catalog
from lorafleet.engine.jobs import Job, Sample, WorkKind
from lorafleet.engine.residency import Lease
from lorafleet.engine.types import SampleRequest, SampleResult, SamplingParams, TopLogprobs
from lorafleet.errors import InvalidRequest, NotFound
from lorafleet.metrics import Metrics
from lorafleet.model.registry import check_base_digest

TokenCallback = Callable[[int, int, int, float, TopLogprobs | None], None]  # (request, sample, token, logprob, top)
T = TypeVar("T")
MAX_CHARS_PER_TOKEN = 32


@dataclass(frozen=True, slots=True)
class Target:
    """What a `model` string resolved to at admission."""

    model: str  # as the caller wrote it
    base: str
    revision_id: str | None  # None: the base model alone


class OpenAIService:
    """Glue between the /v1 routes, the catalog and the engines' serving queues.

    Args:
        runners: base name -> the engine scheduler of that base (engine/scheduler.py):
            `.residency`, `.base` (tokenizer, info) and `.submit(job)`.
    """

    def __init__(self, runners: dict, catalog: Catalog, metrics: Metrics) -> None:
        self.runners = runners
        self.catalog = catalog
        self.metrics = metrics
        self._tokenize_lock = threading.Lock()

    def resolve(self, model: str, who: Principal) -> Target:
        if model in self.runners:
            return Target(model, model, None)
        if not model or model.strip() != model:
            raise InvalidRequest(f"model {model!r} is not a base name or adapter reference")
        try:
            revision = self.catalog.resolve(model, who)
        except NotFound:
            if parse_ref(model).kind is not RefKind.LATEST:
                raise
            raise NotFound(f"model {model!r} is not served here: it is neither a loaded base "
                           f"(loaded: {sorted(self.runners)}) nor an adapter you can see") from None
        policy = self.catalog.get_policy(who, revision.policy)
        if policy.base_model not in self.runners:
            raise NotFound(
                f"{model} is an adapter for {policy.base_model}, which this server does not serve "
                f"(serving: {sorted(self.runners)})"
            )
        check_base_digest(self.runners[policy.base_model].base, policy.base_digest, model)
        return Target(model, policy.base_model, revision.id)

    def tokenizer(self, target: Target):
        return self.runners[target.base].base.tokenizer

    def vocab(self, target: Target) -> tuple[int, int]:
        """(EOS token id, vocabulary size) of the target's base."""
        base = self.runners[target.base].base
        return base.eos_token_id, base.info.vocab_size

    def check_prompt_chars(self, target: Target, chars: int) -> None:
        """Before tokenizing: a prompt this long cannot fit the context window whatever its
        tokens (no token of our tokenizers spans MAX_CHARS_PER_TOKEN characters)."""
        context = self.runners[target.base].base.info.max_context
        if chars > context * MAX_CHARS_PER_TOKEN:
            raise InvalidRequest(
                f"prompt of {chars} characters is too long for the context length of {target.base} "
                f"({context} tokens, at most {context * MAX_CHARS_PER_TOKEN} characters)"
            )

    async def tokenize(self, fn: Callable[..., T], *args) -> T:
        """Run `fn` (tokenizer work) in a worker thread, one at a time: a long prompt must not
        stall the event loop, and a fast tokenizer must not be entered by two threads."""
        def locked() -> T:
            with self._tokenize_lock:
                return fn(*args)

        return await asyncio.to_thread(locked)

    def check_context(self, target: Target, prompt_len: int, max_tokens: int) -> None:
        limit = self.runners[target.base].base.info.max_context
        if prompt_len + max_tokens > limit:
            raise InvalidRequest(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} "
                f"exceeds the context length of {target.base}: {limit} tokens"
            )

    # ---- residency: admission leases, warm-up and pins ----------------------------------

    async def acquire(self, target: Target) -> Lease | None:
        """A residency lease on the target's revision, its weights in host memory (None: the
        base alone). A miss waits for its cold load (queued, shared with identical misses)
        without holding up resident work; a full load queue raises NoCapacity (429). The
        lease holds the weights from now until the engine releases it when the job ends."""
        if target.revision_id is None:
            return None
        lease = self.runners[target.base].residency.acquire(target.revision_id)
        try:  # shielded: the load is shared, a client that leaves must not cancel it for others
            await asyncio.shield(asyncio.wrap_future(lease.loaded))
        except BaseException:
            lease.release()
            raise
        return lease

    def warm(self, ref: str, who: Principal, tier: str = "slot", timeout_s: float = 120.0) -> dict:
        """Blocking (call from a worker thread): load `ref` into host memory, and into an engine
        slot with tier='slot'. Returns where it is now."""
        if tier not in ("host", "slot"):
            raise InvalidRequest(f"tier must be 'host' or 'slot', got {tier!r}")
        target = self.resolve(ref, who)
        if target.revision_id is None:
            return self._where(target)
        runner = self.runners[target.base]
        lease = runner.residency.acquire(target.revision_id)
        try:
            lease.loaded.result(timeout_s)
        except BaseException:
            lease.release()
            raise
        if tier == "host":
            lease.release()
            return self._where(target)
        reply = Reply()  # a job without requests: the engine puts the adapter into a slot
        self._submit(runner, Job(WorkKind.SAMPLE, Sample([], lease), reply))
        reply.future.result(timeout_s)
        return self._where(target)

    def pin(self, ref: str, who: Principal, timeout_s: float = 120.0) -> dict:
        """Pin `ref` (host and slot) until `unpin`, loading it now."""
        target = self.resolve(ref, who)
        if target.revision_id is not None:
            self.runners[target.base].residency.pin(target.revision_id)
            self.warm(target.revision_id, who, "slot", timeout_s)
        return self._where(target)

    def unpin(self, ref: str, who: Principal) -> dict:
        target = self.resolve(ref, who)
        if target.revision_id is not None:
            self.runners[target.base].residency.unpin(target.revision_id)
        return self._where(target)

    def _where(self, target: Target) -> dict:
        if target.revision_id is None:
            return {"ref": target.model, "revision_id": None, "base": target.base, "tier": "base"}
        residency = self.runners[target.base].residency
        return {"ref": target.model, "revision_id": target.revision_id, "base": target.base,
                "tier": str(residency.tier(target.revision_id)),
                "pinned": residency.is_pinned(target.revision_id)}

    # ---- sampling ---------------------------------------------------------------------------

    async def submit(
        self,
        target: Target,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        on_token: TokenCallback | None = None,
        prompt_logprobs: int | None = None,
    ) -> Admitted:
        """Admission: a residency lease on the target's revision (see `acquire`), then a typed
        sample job on the base's scheduler.

        Raises NoCapacity (429) when the cold-load or sample queue is full, so a caller can
        answer before it sends anything (a stream's status line). The engine releases the
        lease when the job ends (answered, failed, or cancelled by the client).
        `prompt_logprobs`: None = none; 0 = each prompt token's logprob; k > 0 = and the top k.
        """
        runner = self.runners[target.base]
        admitted = Admitted(prompts, n, time.perf_counter())

        def count(i: int, k: int, token: int, logprob: float, top: TopLogprobs | None) -> None:
            if admitted.first_token_at is None:
                admitted.first_token_at = time.perf_counter()
            if on_token is not None:
                on_token(i, k, token, logprob, top)

        lease = await self.acquire(target)
        admitted.reply = Reply(count)
        requests = [SampleRequest(None, p, n, params, prompt_logprobs=prompt_logprobs is not None,
                                  topk_prompt_logprobs=prompt_logprobs or 0) for p in prompts]
        admitted.job = Job(WorkKind.SAMPLE, Sample(requests, lease), admitted.reply)
        self._submit(runner, admitted.job)
        return admitted

    def _submit(self, runner, job: Job) -> None:
        try:
            runner.submit(job)  # NoCapacity (429) when the sample queue is full or draining
        except BaseException:
            if job.payload.lease is not None:
                job.payload.lease.release()
            raise

    async def result(self, admitted: Admitted) -> list[SampleResult]:
        """Wait for an admitted job; cancelling this wait cancels the job (its rows leave the
        batch at the engine's next step)."""
        try:
            results = await asyncio.wrap_future(admitted.reply.future)
        except BaseException:
            admitted.job.cancel()
            raise
        m = self.metrics
        m.request_latency.labels("openai").observe(time.perf_counter() - admitted.t0)
        if admitted.first_token_at is not None:
            m.first_token_latency.labels("openai").observe(admitted.first_token_at - admitted.t0)
        m.tokens.labels("prompt").inc(sum(len(p) for p in admitted.prompts) * admitted.n)
        m.tokens.labels("completion").inc(sum(len(q.tokens) for r in results for q in r.sequences))
        return results

    async def sample(
        self,
        target: Target,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        on_token: TokenCallback | None = None,
        prompt_logprobs: int | None = None,
    ) -> list[SampleResult]:
        """Sample `n` completions per prompt on the target's revision: `submit`, then `result`."""
        return await self.result(await self.submit(target, prompts, params, n, on_token, prompt_logprobs))


@dataclass(slots=True)
class Admitted:
    """A sample job that passed admission: its revision is leased and the job is queued."""

    prompts: list[list[int]]
    n: int
    t0: float
    job: Job | None = None
    reply: Reply | None = None
    first_token_at: float | None = None

    def cancel(self) -> None:
        """The client went away: the engine drops the job (its rows leave at the next step)."""
        if self.job is not None:
            self.job.cancel()
        if self.reply is not None:
            self.reply.future.cancel()


class Reply:
    """The sink of one OpenAI-API job: a concurrent future for its results, tokens to a callback.

    The awaiting side may have cancelled the future (the client left): a late result is dropped,
    nothing is ever set on a cancelled future.
    """

    def __init__(self, on_token: TokenCallback | None = None) -> None:
        self.future: Future = Future()
        self._on_token = on_token

    def done(self, job: Job, result: Any) -> None:
        with contextlib.suppress(InvalidStateError):
            self.future.set_result(result)

    def failed(self, job: Job, error: Exception) -> None:
        with contextlib.suppress(InvalidStateError):
            self.future.set_exception(error)

    def on_token(self, job: Job, request: int, sample: int, token: int, logprob: float,
                 top: TopLogprobs | None = None) -> None:
        if self._on_token is not None:
            self._on_token(request, sample, token, logprob, top)
