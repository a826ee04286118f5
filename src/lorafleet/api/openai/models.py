"""/v1 model routes: the paginated model list, one model, and vLLM's dynamic LoRA routes.

`GET /v1/models` lists what the caller may put in `model`: the loaded bases first (sorted, as
vLLM lists its base first), then every adapter the caller can use on a loaded base, in catalog
creation order: its own, published ones, and with `--auth none` (the local admin) every
adapter in the catalog. Pages follow OpenAI's cursor lists: `?limit=` (1..1000, default
1000) and `?after=<id of the last model seen>`; the answer carries `has_more`, `first_id` and
`last_id` (pass `last_id` as the next `after`). The OpenAI SDK's `models.list()` reads `data`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from lorafleet.api.auth import get_tenant
from lorafleet.api.checks import Checked, refuse_nul_params
from lorafleet.api.openai import schemas as s
from lorafleet.api.openai.dynamic import LORA_NAME_KEY, DynamicLoras
from lorafleet.api.openai.service import OpenAIService, own_ref
from lorafleet.api.tinker.catalog_bridge import policy_name
from lorafleet.catalog.records import Policy, Principal
from lorafleet.catalog.validate import MAX_PAGE
from lorafleet.errors import InvalidRequest, NotFound

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(refuse_nul_params)])
# vLLM's runtime LoRA routes: on /v1 only (hosted Tinker's /oai/api/v1 mount has none)
lora_router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(refuse_nul_params)])


class ModelPage(BaseModel):
    object: str = "list"
    data: list[s.ModelCard]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class LoadLoraRequest(Checked):
    """vLLM's LoadLoRAAdapterRequest."""

    model_config = ConfigDict(extra="allow")

    lora_name: str = Field(default="", max_length=200)
    lora_path: str = Field(default="", max_length=4096)
    load_inplace: bool = False
    base_model_name: str | None = None


class UnloadLoraRequest(Checked):
    """vLLM's UnloadLoRAAdapterRequest (`lora_int_id` is vLLM-internal: not accepted here)."""

    model_config = ConfigDict(extra="allow")

    lora_name: str = Field(default="", max_length=200)


def get_service(request: Request) -> OpenAIService:
    return request.app.state.openai


def get_dynamic(request: Request) -> DynamicLoras:
    return request.app.state.dynamic_loras


def model_id(p: Policy, who: Principal) -> str:
    """The id a caller uses for a policy: the bare name it loaded it as, else `owner/name`."""
    if p.owner == who.tenant and p.metadata.get(LORA_NAME_KEY) == p.name:
        return p.name
    return p.full_name


def card(model: str, p: Policy, created: int | None = None) -> s.ModelCard:
    return s.ModelCard(id=model, created=created or int(p.created_at.timestamp()), owned_by=p.owner,
                       root=p.base_model, parent=p.base_model)


def is_unnamed_run(p: Policy) -> bool:
    return bool(p.tinker_run_id) and not p.public and p.full_name == policy_name(p.owner, p.tinker_run_id)


def list_models(svc: OpenAIService, who: Principal, *, after: str | None, limit: int,
                runs: bool = True) -> ModelPage:
    """One page of the model list (blocking: catalog reads)."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be in 1..{MAX_PAGE}, got {limit}")
    now = int(time.time())
    bases = sorted(svc.runners)
    cursor = None
    if after is not None:
        if after in bases:
            bases = bases[bases.index(after) + 1:]
        else:
            try:
                cursor = svc.catalog.get_policy(who, own_ref(after, who)).id
            except (NotFound, InvalidRequest):
                raise InvalidRequest(f"after={after!r} is not the id of a model in this list") from None
            bases = []
    cards = [s.ModelCard(id=b, created=now, owned_by="lorafleet") for b in bases][: limit + 1]
    only_base = next(iter(svc.runners)) if len(svc.runners) == 1 else None
    while len(cards) <= limit:
        page = svc.catalog.list_policies(who, base_model=only_base, limit=MAX_PAGE, cursor=cursor)
        for p in page.items:
            if p.base_model in svc.runners and (runs or not is_unnamed_run(p)):
                cards.append(card(model_id(p, who), p))
                if len(cards) > limit:
                    break
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    more = len(cards) > limit
    cards = cards[:limit]
    return ModelPage(data=cards, first_id=cards[0].id if cards else None,
                     last_id=cards[-1].id if cards else None, has_more=more)


@router.get("/models", response_model=ModelPage)
async def models(runs: bool = True, after: Annotated[str | None, Query(max_length=400)] = None,
                 limit: int = MAX_PAGE, who: Principal = Depends(get_tenant),
                 svc: OpenAIService = Depends(get_service)) -> ModelPage:
    """The bases and every adapter the caller may use; `?runs=false` leaves out Tinker training
    runs that still have their automatic private `tinker-...` name (named or published runs
    stay). Paginated: `limit`, `after`, answered with `has_more` / `last_id`."""
    return await asyncio.to_thread(list_models, svc, who, after=after, limit=limit, runs=runs)


@router.get("/models/{model:path}", response_model=s.ModelCard)
async def retrieve_model(model: str, who: Principal = Depends(get_tenant),
                         svc: OpenAIService = Depends(get_service)) -> s.ModelCard:
    """One model: a base, or any adapter reference `model` accepts (`owner/name:alias`, ...)."""
    def one() -> s.ModelCard:
        target = svc.resolve(model, who)
        if target.revision_id is None:
            return s.ModelCard(id=model, created=int(time.time()), owned_by="lorafleet")
        revision = svc.catalog.resolve(target.revision_id, who)
        return card(model, svc.catalog.get_policy(who, revision.policy), int(revision.created_at.timestamp()))

    return await asyncio.to_thread(one)  # catalog reads stay off the event loop


@lora_router.post("/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(req: LoadLoraRequest, who: Principal = Depends(get_tenant),
                            dyn: DynamicLoras = Depends(get_dynamic)) -> PlainTextResponse:
    """vLLM's route: import the PEFT folder at `lora_path` (under a `--lora-root`) as a new
    revision of `lora_name` and pin it. 200 with vLLM's text; errors as JSON 4xx."""
    if not req.lora_name or not req.lora_path:
        raise InvalidRequest("Both 'lora_name' and 'lora_path' must be provided.")
    await asyncio.to_thread(dyn.load, who, req.lora_name, req.lora_path, inplace=req.load_inplace,
                            base_model=req.base_model_name)
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")


@lora_router.post("/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(req: UnloadLoraRequest, who: Principal = Depends(get_tenant),
                              dyn: DynamicLoras = Depends(get_dynamic)) -> PlainTextResponse:
    """vLLM's route: unpin and evict what `load_lora_adapter` loaded (the revision stays)."""
    if not req.lora_name:
        raise InvalidRequest("'lora_name' must be provided.")
    await asyncio.to_thread(dyn.unload, who, req.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
