"""OpenAI-API use cases: resolve `model` to a base and revision, admit, sample, stream.

A request's adapter reference (`owner/name`, `owner/name:alias`, `owner/name@rev`,
`tinker://...`) resolves to one immutable revision at admission; the request then runs on
that revision even if the alias moves meanwhile. A cold revision is loaded by the residency
manager's scheduler while the request waits (without holding up resident work); a full load
queue answers 429 + Retry-After.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

from lorafleet.catalog.records import Principal
from lorafleet.catalog.refs import RefKind, parse_ref
from lorafleet.catalog.service import Catalog
from lorafleet.engine.types import SampleRequest, SampleResult, SamplingParams
from lorafleet.engine.residency import Tier
from lorafleet.errors import InvalidRequest, NoCapacity, NotFound
from lorafleet.metrics import Metrics
from lorafleet.model.registry import check_base_digest

TokenCallback = Callable[[int, int, int, float], None]  # (request, sample, token, logprob)
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
        runners: base name -> the runner that owns that base's engine (see api/runner.py):
            `.residency`, `.base` (tokenizer, info) and `.submit_serving(...)`.
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

    # ---- residency: admission holds, warm-up and pins -----------------------------------

    async def hold(self, target: Target) -> None:
        """Make the target's revision host-resident and pin it there until `release`.

        A miss waits for its cold load (queued, shared with identical misses) without holding
        up resident work; a full load queue raises NoCapacity (429). The pin keeps the weights
        in host memory until the engine has put them into a slot, however busy the cache is.
        """
        if target.revision_id is None:
            return
        residency = self.runners[target.base].residency
        for _ in range(8):
            await asyncio.wrap_future(residency.ensure_host(target.revision_id))
            residency.hold(target.revision_id)
            if residency.tier(target.revision_id) != Tier.STORE:
                return
            residency.release(target.revision_id)  # evicted between load and hold: load again
        raise NoCapacity("the adapter cache is too busy to keep this adapter; retry shortly")

    def release(self, target: Target) -> None:
        if target.revision_id is not None:
            self.runners[target.base].residency.release(target.revision_id)

    def warm(self, ref: str, who: Principal, tier: str = "slot", timeout_s: float = 120.0) -> dict:
        """Blocking (call from a worker thread): load `ref` into host memory, and into an engine
        slot with tier='slot'. Returns where it is now."""
        if tier not in ("host", "slot"):
            raise InvalidRequest(f"tier must be 'host' or 'slot', got {tier!r}")
        target = self.resolve(ref, who)
        if target.revision_id is None:
            return self._where(target)
        runner = self.runners[target.base]
        runner.residency.ensure_host(target.revision_id).result(timeout_s)
        if tier == "slot":
            runner.residency.hold(target.revision_id)
            try:
                if runner.residency.tier(target.revision_id) == Tier.STORE:  # evicted meanwhile
                    raise NoCapacity("the adapter cache is too busy to warm this adapter; retry shortly")
                runner.submit_serving(target.revision_id, []).result(timeout_s)
            finally:
                runner.residency.release(target.revision_id)
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
    ) -> Admitted:
        """Admission: hold the target's revision in host memory (see `hold`) and queue the job.

        Raises NoCapacity (429) when the cold-load or serving queue is full, so a caller can
        answer before it sends anything (a stream's status line). The hold is released when the
        job's future is done (answered, failed, or cancelled by the client), even if nobody
        awaits it.
        """
        runner = self.runners[target.base]
        admitted = Admitted(prompts, n, time.perf_counter())

        def count(i: int, k: int, token: int, logprob: float) -> None:
            if admitted.first_token_at is None:
                admitted.first_token_at = time.perf_counter()
            if on_token is not None:
                on_token(i, k, token, logprob)

        await self.hold(target)
        try:
            requests = [SampleRequest(None, p, n, params) for p in prompts]
            admitted.future = runner.submit_serving(target.revision_id, requests, count)
        except BaseException:
            self.release(target)
            raise
        admitted.future.add_done_callback(lambda _: self.release(target))
        return admitted

    async def result(self, admitted: Admitted) -> list[SampleResult]:
        """Wait for an admitted job; cancelling this wait cancels the job (its rows stop)."""
        results = await asyncio.wrap_future(admitted.future)
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
    ) -> list[SampleResult]:
        """Sample `n` completions per prompt on the target's revision: `submit`, then `result`."""
        return await self.result(await self.submit(target, prompts, params, n, on_token))


@dataclass(slots=True)
class Admitted:
    """A serving job that passed admission: its revision is held and it is queued."""

    prompts: list[list[int]]
    n: int
    t0: float
    future: Future = field(default_factory=Future)
    first_token_at: float | None = None
