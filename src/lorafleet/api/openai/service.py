"""OpenAI-API use cases: resolve `model` to a base and revision, admit, sample, stream.

A request's adapter reference (`owner/name`, `owner/name:alias`, `owner/name@rev`,
`tinker://...`) resolves to one immutable revision at admission; the request then runs on
that revision even if the alias moves meanwhile. A cold revision is loaded by the residency
manager's scheduler while the request waits (without holding up resident work); a full load
queue answers 429 + Retry-After.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from lorafleet.catalog.records import Principal
from lorafleet.catalog.service import Catalog
from lorafleet.engine.types import SampleRequest, SampleResult, SamplingParams
from lorafleet.errors import InvalidRequest, NotFound
from lorafleet.metrics import Metrics

TokenCallback = Callable[[int, int, int, float], None]  # (request, sample, token, logprob)


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

    def resolve(self, model: str, who: Principal) -> Target:
        if model in self.runners:
            return Target(model, model, None)
        if not model or model.strip() != model:
            raise InvalidRequest(f"model {model!r} is not a base name or adapter reference")
        revision = self.catalog.resolve(model, who)
        policy = self.catalog.get_policy(who, revision.policy)
        if policy.base_model not in self.runners:
            raise NotFound(
                f"{model} is an adapter for {policy.base_model}, which this server does not serve "
                f"(serving: {sorted(self.runners)})"
            )
        return Target(model, policy.base_model, revision.id)

    def tokenizer(self, target: Target):
        return self.runners[target.base].base.tokenizer

    def check_context(self, target: Target, prompt_len: int, max_tokens: int) -> None:
        limit = self.runners[target.base].base.info.max_context
        if prompt_len + max_tokens > limit:
            raise InvalidRequest(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} "
                f"exceeds the context length of {target.base}: {limit} tokens"
            )

    async def sample(
        self,
        target: Target,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        on_token: TokenCallback | None = None,
    ) -> list[SampleResult]:
        """Sample `n` completions per prompt on the target's revision."""
        runner = self.runners[target.base]
        t0 = time.perf_counter()
        if target.revision_id is not None:
            await asyncio.wrap_future(runner.residency.ensure_host(target.revision_id))
        requests = [SampleRequest(None, p, n, params) for p in prompts]
        future = runner.submit_serving(target.revision_id, requests, on_token)
        results = await asyncio.wrap_future(future)
        self.metrics.request_latency.labels("openai").observe(time.perf_counter() - t0)
        return results
