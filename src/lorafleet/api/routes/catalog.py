"""HTTP catalog API under /catalog/v1: thin handlers over `lorafleet.catalog.Catalog`.

Wire models (pydantic, `*In` / `*Out`) live here, apart from the catalog records; `to_wire`
style functions convert. References (`owner/name:alias`, `owner/name@rev`, `tinker://...`)
contain slashes and colons, so they travel as the `ref` query parameter or body field.
Handlers are plain `def`: FastAPI runs them in its thread pool, off the event loop, because the
catalog does blocking database and store I/O. Mount with `app.include_router(router)` and set
`app.state.catalog`, wrap the app in `lorafleet.api.edge.Edge` (who is calling) and map errors
with `lorafleet.api.errors.install`.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import ConfigDict, Field

from lorafleet.api.auth import get_catalog, get_tenant, require_admin
from lorafleet.api.checks import Checked, refuse_nul_params
from lorafleet.catalog.records import (
    Alias, AliasEvent, AuditEvent, Comparison, Evaluation, GcReport, Lineage, LoraConfig, Policy, Principal,
    Provenance, Revision,
)
from lorafleet.catalog.refs import check_alias
from lorafleet.catalog.service import Catalog
from lorafleet.errors import InvalidRequest

Cat = Annotated[Catalog, Depends(get_catalog)]
Who = Annotated[Principal, Depends(get_tenant)]


class _Wire(Checked):  # finite numbers, no NUL in any string (api/checks.py)
    model_config = ConfigDict(extra="forbid")


# ---- wire models ------------------------------------------------------------------------


class LoraConfigWire(_Wire):
    rank: int = Field(ge=1, le=128)
    alpha: float = Field(default=32.0, gt=0)
    target_modules: list[str] = Field(min_length=1)
    use_rslora: bool = False


class PolicyIn(_Wire):
    name: str = Field(description="owner/name")
    base_model: str
    lora: LoraConfigWire
    base_digest: str | None = None
    public: bool = False
    metadata: dict[str, str] = Field(default_factory=dict)
    parent: str | None = Field(default=None, description="reference of the revision to branch from")
    # No `tinker_run_id`: only the Tinker service names runs (api/tinker/catalog_bridge.py).
    # Taken from a tenant it would let one squat another's run id, or probe which ids exist.


class PolicyOut(_Wire):
    id: str
    name: str
    owner: str
    base_model: str
    base_digest: str | None
    lora: LoraConfigWire
    parent_revision_id: str | None
    public: bool
    created_at: datetime
    metadata: dict[str, str]
    tinker_run_id: str | None


class PolicyList(_Wire):
    items: list[PolicyOut]
    next_cursor: str | None


class ProvenanceWire(_Wire):
    parent_revision_id: str | None = Field(default=None, description="any reference")
    loss_fn: str | None = None
    loss_config: dict[str, object] | None = None
    optimizer_config: dict[str, object] | None = None
    data_digest: str | None = None
    code_version: str | None = None


class RevisionIn(_Wire):
    files: dict[str, str] = Field(description="filename -> base64 bytes")
    kind: str = "sampler"
    step: int | None = None
    provenance: ProvenanceWire = Field(default_factory=ProvenanceWire)
    tinker_path: str | None = None
    expires_at: datetime | None = None
    aliases: list[str] = Field(default_factory=list)


class RevisionOut(_Wire):
    id: str
    policy: str
    seq: int
    kind: str
    sha256: str
    size_bytes: int
    step: int | None
    provenance: ProvenanceWire
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    tinker_path: str | None


class RevisionList(_Wire):
    items: list[RevisionOut]
    next_cursor: str | None


class ManifestOut(_Wire):
    revision: RevisionOut
    files: dict[str, dict[str, object]]


class AliasIn(_Wire):
    ref: str = Field(description="reference of the target revision (in this policy)")
    require: str | None = Field(default=None, description="gate such as accuracy>=0.8")
    reason: str | None = None
    prewarm: bool = Field(default=False, description="load the target into host memory and an "
                          "engine slot before the alias moves (readiness gate)")


class RollbackIn(_Wire):
    to: str | None = Field(default=None, description="reference; default: the previous target")
    reason: str | None = None
    prewarm: bool = Field(default=False, description="as for PUT alias (a resident target is instant)")


class WarmIn(_Wire):
    refs: list[str] = Field(min_length=1, max_length=256, description="adapter references")
    tier: Literal["host", "slot"] = "slot"


class PinIn(_Wire):
    ref: str


class ResidencyOut(_Wire):
    ref: str
    revision_id: str | None
    base: str
    tier: str
    pinned: bool = False


class AliasOut(_Wire):
    policy: str
    name: str
    revision_id: str
    version: int
    updated_at: datetime


class AliasEventOut(_Wire):
    policy: str
    alias: str
    seq: int
    action: str
    from_revision_id: str | None
    to_revision_id: str
    actor: str
    reason: str | None
    at: datetime


class EvaluationIn(_Wire):
    ref: str
    suite: str
    metrics: dict[str, float]
    details: dict[str, object] = Field(default_factory=dict)


class EvaluationOut(_Wire):
    id: int
    revision_id: str
    suite: str
    metrics: dict[str, float]
    details: dict[str, object]
    created_by: str
    created_at: datetime


class MetricDeltaOut(_Wire):
    suite: str
    metric: str
    a: float | None
    b: float | None
    delta: float | None


class ComparisonOut(_Wire):
    a: str
    b: str
    rows: list[MetricDeltaOut]


class LineageOut(_Wire):
    revision: RevisionOut
    ancestors: list[RevisionOut]
    descendants: list[RevisionOut]


class KeyIn(_Wire):
    tenant: str
    label: str | None = None


class KeyOut(_Wire):
    tenant: str
    key: str


class AuditEventOut(_Wire):
    id: int
    at: datetime
    actor: str
    tenant: str
    action: str
    target: str
    from_value: str | None
    to_value: str | None
    reason: str | None


class AuditList(_Wire):
    items: list[AuditEventOut]
    next_cursor: str | None


class GcOut(_Wire):
    expired_revisions_deleted: int
    expired_revisions_kept: int
    blobs_deleted: int
    bytes_freed: int
    tmp_files_deleted: int


# ---- conversions ------------------------------------------------------------------------


def policy_to_wire(p: Policy) -> PolicyOut:
    return PolicyOut(
        id=p.id, name=p.full_name, owner=p.owner, base_model=p.base_model, base_digest=p.base_digest,
        lora=LoraConfigWire(rank=p.lora.rank, alpha=p.lora.alpha,
                            target_modules=list(p.lora.target_modules), use_rslora=p.lora.use_rslora),
        parent_revision_id=p.parent_revision_id, public=p.public, created_at=p.created_at,
        metadata=p.metadata, tinker_run_id=p.tinker_run_id,
    )


def revision_to_wire(r: Revision) -> RevisionOut:
    pv = r.provenance
    return RevisionOut(
        id=r.id, policy=r.policy, seq=r.seq, kind=str(r.kind), sha256=r.sha256,
        size_bytes=r.size_bytes, step=r.step,
        provenance=ProvenanceWire(
            parent_revision_id=pv.parent_revision_id, loss_fn=pv.loss_fn, loss_config=pv.loss_config,
            optimizer_config=pv.optimizer_config, data_digest=pv.data_digest, code_version=pv.code_version),
        created_by=r.created_by, created_at=r.created_at, expires_at=r.expires_at, tinker_path=r.tinker_path,
    )


def alias_to_wire(a: Alias) -> AliasOut:
    return AliasOut(policy=a.policy, name=a.name, revision_id=a.revision_id, version=a.version, updated_at=a.updated_at)


def event_to_wire(e: AliasEvent) -> AliasEventOut:
    return AliasEventOut(policy=e.policy, alias=e.alias, seq=e.seq, action=e.action,
                         from_revision_id=e.from_revision_id, to_revision_id=e.to_revision_id,
                         actor=e.actor, reason=e.reason, at=e.at)


def evaluation_to_wire(e: Evaluation) -> EvaluationOut:
    return EvaluationOut(id=e.id, revision_id=e.revision_id, suite=e.suite, metrics=e.metrics,
                         details=e.details, created_by=e.created_by, created_at=e.created_at)


def comparison_to_wire(c: Comparison) -> ComparisonOut:
    return ComparisonOut(a=c.a, b=c.b, rows=[MetricDeltaOut(suite=d.suite, metric=d.metric, a=d.a, b=d.b, delta=d.delta) for d in c.rows])


def lineage_to_wire(lin: Lineage) -> LineageOut:
    return LineageOut(revision=revision_to_wire(lin.revision),
                      ancestors=[revision_to_wire(r) for r in lin.ancestors],
                      descendants=[revision_to_wire(r) for r in lin.descendants])


def _decode_files(files: dict[str, str]) -> dict[str, bytes]:
    out = {}
    for name, text in files.items():
        try:
            out[name] = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"files[{name!r}] is not valid base64") from None
    return out


def _meta_filters(meta: list[str]) -> dict[str, str]:
    out = {}
    for m in meta:
        if "=" not in m:
            raise InvalidRequest(f"meta filter {m!r}: expected KEY=VALUE")
        k, v = m.split("=", 1)
        out[k] = v
    return out


# ---- routes -----------------------------------------------------------------------------

router = APIRouter(prefix="/catalog/v1", tags=["catalog"], dependencies=[Depends(refuse_nul_params)])


def catalog_router() -> APIRouter:
    """The router to mount (the module-level `router`)."""
    return router


@router.get("/policies", response_model=PolicyList)
def list_policies(
    catalog: Cat, who: Who, owner: str | None = None, base_model: str | None = None,
    meta: Annotated[list[str], Query(description="KEY=VALUE, repeatable")] = [],  # noqa: B006
    q: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 50, cursor: str | None = None,
) -> PolicyList:
    page = catalog.list_policies(who, owner=owner, base_model=base_model, metadata=_meta_filters(meta),
                                 query=q, limit=limit, cursor=cursor)
    return PolicyList(items=[policy_to_wire(p) for p in page.items], next_cursor=page.next_cursor)


@router.post("/policies", response_model=PolicyOut, status_code=201)
def create_policy(body: PolicyIn, catalog: Cat, who: Who) -> PolicyOut:
    lora = LoraConfig(body.lora.rank, body.lora.alpha, tuple(body.lora.target_modules), body.lora.use_rslora)
    return policy_to_wire(catalog.create_policy(
        who, body.name, body.base_model, lora, base_digest=body.base_digest, public=body.public,
        metadata=body.metadata, parent=body.parent))


@router.get("/policies/{owner}/{name}", response_model=PolicyOut)
def get_policy(owner: str, name: str, catalog: Cat, who: Who) -> PolicyOut:
    return policy_to_wire(catalog.get_policy(who, f"{owner}/{name}"))


class VisibilityIn(_Wire):
    public: bool


@router.put("/policies/{owner}/{name}/visibility", response_model=PolicyOut)
def set_visibility(owner: str, name: str, body: VisibilityIn, catalog: Cat, who: Who) -> PolicyOut:
    return policy_to_wire(catalog.set_public(who, f"{owner}/{name}", body.public))


@router.delete("/policies/{owner}/{name}", status_code=204)
def delete_policy(owner: str, name: str, catalog: Cat, who: Who) -> Response:
    catalog.delete_policy(who, f"{owner}/{name}")
    return Response(status_code=204)


@router.get("/policies/{owner}/{name}/revisions", response_model=RevisionList)
def list_revisions(owner: str, name: str, catalog: Cat, who: Who,
                   limit: Annotated[int, Query(ge=1, le=1000)] = 50, cursor: str | None = None) -> RevisionList:
    page = catalog.list_revisions(who, f"{owner}/{name}", limit=limit, cursor=cursor)
    return RevisionList(items=[revision_to_wire(r) for r in page.items], next_cursor=page.next_cursor)


@router.post("/policies/{owner}/{name}/revisions", response_model=RevisionOut, status_code=201)
def publish(owner: str, name: str, body: RevisionIn, catalog: Cat, who: Who) -> RevisionOut:
    pv = body.provenance
    rev = catalog.publish(
        who, f"{owner}/{name}", _decode_files(body.files), kind=body.kind, step=body.step,
        provenance=Provenance(pv.parent_revision_id, pv.loss_fn, pv.loss_config,  # type: ignore[arg-type]
                              pv.optimizer_config, pv.data_digest, pv.code_version),
        tinker_path=body.tinker_path, expires_at=body.expires_at, aliases=body.aliases)
    return revision_to_wire(rev)


@router.get("/resolve", response_model=RevisionOut)
def resolve(ref: str, catalog: Cat, who: Who) -> RevisionOut:
    return revision_to_wire(catalog.resolve(ref, who))


@router.get("/manifest", response_model=ManifestOut)
def manifest(ref: str, catalog: Cat, who: Who) -> ManifestOut:
    rev = catalog.resolve(ref, who)
    m = catalog.manifest(who, rev.id)
    return ManifestOut(revision=revision_to_wire(rev),
                       files={n: {"sha256": b.sha256, "size_bytes": b.size_bytes} for n, b in m.files})


@router.get("/files", response_class=Response)
def download(ref: str, name: str, catalog: Cat, who: Who) -> Response:
    """One file of a revision, verified against its sha256 before a byte is sent."""
    files = catalog.read_files(who, ref)
    if name not in files:
        raise InvalidRequest(f"revision {ref!r} has no file {name!r}; it has {sorted(files)}")
    return Response(files[name], media_type="application/octet-stream")


@router.delete("/revisions", status_code=204)
def delete_revision(ref: str, catalog: Cat, who: Who) -> Response:
    catalog.delete_revision(who, ref)
    return Response(status_code=204)


@router.get("/policies/{owner}/{name}/aliases", response_model=list[AliasOut])
def list_aliases(owner: str, name: str, catalog: Cat, who: Who) -> list[AliasOut]:
    return [alias_to_wire(a) for a in catalog.list_aliases(who, f"{owner}/{name}")]


@router.put("/policies/{owner}/{name}/aliases/{alias}", response_model=AliasEventOut)
def set_alias(owner: str, name: str, alias: str, body: AliasIn, catalog: Cat, who: Who,
              request: Request) -> AliasEventOut:
    check_alias(alias)
    rev = catalog.resolve(body.ref, who)
    if rev.policy != f"{owner}/{name}":
        raise InvalidRequest(f"{body.ref!r} is a revision of {rev.policy}, not of {owner}/{name}")
    if body.prewarm:  # register -> prewarm -> expose: users of the alias never wait for a load
        _serving(request).warm(rev.id, who, "slot")
    return event_to_wire(catalog.set_alias(who, rev.id, alias, require=body.require, reason=body.reason))


@router.get("/policies/{owner}/{name}/aliases/{alias}/history", response_model=list[AliasEventOut])
def alias_history(owner: str, name: str, alias: str, catalog: Cat, who: Who) -> list[AliasEventOut]:
    return [event_to_wire(e) for e in catalog.alias_history(who, f"{owner}/{name}:{alias}")]


@router.post("/policies/{owner}/{name}/aliases/{alias}/rollback", response_model=AliasEventOut)
def rollback(owner: str, name: str, alias: str, body: RollbackIn, catalog: Cat, who: Who,
             request: Request) -> AliasEventOut:
    if body.prewarm and body.to:
        _serving(request).warm(body.to, who, "slot")
    return event_to_wire(catalog.rollback(who, f"{owner}/{name}:{alias}", to=body.to, reason=body.reason))


@router.post("/evaluations", response_model=EvaluationOut, status_code=201)
def record_evaluation(body: EvaluationIn, catalog: Cat, who: Who) -> EvaluationOut:
    return evaluation_to_wire(catalog.record_evaluation(who, body.ref, body.suite, body.metrics, body.details))


@router.get("/evaluations", response_model=list[EvaluationOut])
def list_evaluations(ref: str, catalog: Cat, who: Who) -> list[EvaluationOut]:
    return [evaluation_to_wire(e) for e in catalog.list_evaluations(who, ref)]


@router.get("/compare", response_model=ComparisonOut)
def compare(a: str, b: str, catalog: Cat, who: Who) -> ComparisonOut:
    return comparison_to_wire(catalog.compare(who, a, b))


@router.get("/lineage", response_model=LineageOut)
def lineage(ref: str, catalog: Cat, who: Who) -> LineageOut:
    return lineage_to_wire(catalog.lineage(who, ref))


@router.post("/keys", response_model=KeyOut, status_code=201)
def create_key(body: KeyIn, catalog: Cat, _: Annotated[Principal, Depends(require_admin)]) -> KeyOut:
    return KeyOut(tenant=body.tenant, key=catalog.create_key(body.tenant, body.label, actor=_.tenant))


@router.get("/audit", response_model=AuditList)
def audit(catalog: Cat, who: Who, tenant: str | None = None,
          limit: Annotated[int, Query(ge=1, le=1000)] = 50, cursor: str | None = None) -> AuditList:
    """Alias moves, rollbacks, deletions, key creation and revocation, tenant deletion: newest
    first. A tenant sees the events about its own objects; the admin every tenant's."""
    page = catalog.list_audit(who, tenant=tenant, limit=limit, cursor=cursor)
    return AuditList(items=[AuditEventOut(**_fields(e)) for e in page.items], next_cursor=page.next_cursor)


def _fields(e: AuditEvent) -> dict:
    return {f: getattr(e, f) for f in AuditEventOut.model_fields}


@router.post("/gc", response_model=GcOut)
def gc(catalog: Cat, _: Annotated[Principal, Depends(require_admin)],
       grace_s: Annotated[float, Query(ge=0, allow_inf_nan=False)] = 3600.0) -> GcOut:
    r: GcReport = catalog.gc(grace_s=grace_s)
    return GcOut(**{f: getattr(r, f) for f in GcOut.model_fields})


# ---- residency (serving): warm-up and pins ------------------------------------------------


def _serving(request: Request):
    svc = getattr(request.app.state, "openai", None)
    if svc is None:
        raise InvalidRequest("this server serves no adapters (no engine): warm and pin are unavailable")
    return svc


@router.post("/warm", response_model=list[ResidencyOut])
def warm(body: WarmIn, who: Who, request: Request) -> list[ResidencyOut]:
    """Prefetch references into host memory (`tier: host`) or engine slots (`tier: slot`)."""
    svc = _serving(request)
    return [ResidencyOut(**svc.warm(ref, who, body.tier)) for ref in body.refs]


@router.post("/pin", response_model=ResidencyOut)
def pin(body: PinIn, who: Who, request: Request) -> ResidencyOut:
    """Load `ref` into a slot and keep it there (and in host memory) until unpinned."""
    return ResidencyOut(**_serving(request).pin(body.ref, who))


@router.post("/unpin", response_model=ResidencyOut)
def unpin(body: PinIn, who: Who, request: Request) -> ResidencyOut:
    return ResidencyOut(**_serving(request).unpin(body.ref, who))
