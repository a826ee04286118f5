"""Frozen domain records of the catalog: what repo.py returns and service.py hands out.

These are neither table rows (catalog/tables.py) nor wire models (api/routes/catalog.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Generic, NewType, TypeVar

from lorafleet.store.manifest import Manifest

PolicyId = NewType("PolicyId", str)
RevisionId = NewType("RevisionId", str)

LOCAL_TENANT = "local"
T = TypeVar("T")


class RevisionKind(StrEnum):
    SAMPLER = "sampler"  # adapter weights only: what sampling and serving load
    STATE = "state"  # weights + optimizer state: what training resumes from


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking. `admin` (the local CLI, `--auth none`) sees and edits every policy."""

    tenant: str
    admin: bool = False

    def can_see(self, owner: str, public: bool) -> bool:
        return self.admin or public or owner == self.tenant

    def can_write(self, owner: str) -> bool:
        return self.admin or owner == self.tenant


ADMIN = Principal(LOCAL_TENANT, admin=True)


@dataclass(frozen=True, slots=True)
class Tenant:
    """An owner of policies and keys. A deleted tenant keeps its data but cannot authenticate."""

    name: str
    created_at: datetime
    deleted_at: datetime | None
    active_keys: int  # keys not revoked


@dataclass(frozen=True, slots=True)
class ApiKey:
    """What is known about an API key besides its secret (which is never stored, only its hash)."""

    id: str  # `key_` + the first 16 hex digits of the key's sha256
    prefix: str | None  # the key's first characters, e.g. `tml-AbCd1234` (None: keys before 0002)
    tenant: str
    label: str | None
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class LoraConfig:
    """The LoRA shape every revision of a policy shares."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False


@dataclass(frozen=True, slots=True)
class Policy:
    """The durable identity of one trained behaviour: `owner/name` over one base model."""

    id: PolicyId
    owner: str  # tenant name
    name: str
    base_model: str
    base_digest: str | None
    lora: LoraConfig
    parent_revision_id: RevisionId | None  # set when branched from another policy's revision
    public: bool
    created_at: datetime
    metadata: dict[str, str] = field(default_factory=dict, hash=False)
    tinker_run_id: str | None = None
    deleted_at: datetime | None = None

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


@dataclass(frozen=True, slots=True)
class Provenance:
    """How a revision came to be. Every field is optional: imports know little."""

    parent_revision_id: RevisionId | None = None
    loss_fn: str | None = None
    loss_config: dict[str, object] | None = None
    optimizer_config: dict[str, object] | None = None
    data_digest: str | None = None  # sha256 over the training data consumed since the parent
    code_version: str | None = None


@dataclass(frozen=True, slots=True)
class Revision:
    """One published, immutable version of a policy's adapter. Never edited."""

    id: RevisionId
    policy_id: PolicyId
    policy: str  # owner/name, for display
    seq: int  # 1, 2, 3 ... within the policy
    kind: RevisionKind
    sha256: str  # of the canonical manifest
    size_bytes: int
    store_url: str
    step: int | None
    provenance: Provenance
    created_by: str  # tenant
    created_at: datetime
    expires_at: datetime | None
    tinker_path: str | None
    manifest: Manifest | None = None  # loaded on demand (files are a second query)


@dataclass(frozen=True, slots=True)
class Alias:
    """A movable pointer `owner/name:alias` -> revision."""

    policy: str
    name: str
    revision_id: RevisionId
    version: int  # number of moves so far
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Quotas:
    """Per-tenant limits; None: unlimited. A tenant's own values (`lorafleet keys create
    --max-runs ...`) win over the server's defaults (`lorafleet serve --max-runs ...`)."""

    max_runs: int | None = None  # training runs in open sessions (hard cap: 403)
    max_queued: int | None = None  # Tinker requests pending at once (429 + Retry-After)
    max_adapters: int | None = None  # catalog policies owned (hard cap: 403)

    def over(self, defaults: Quotas) -> Quotas:
        return Quotas(*(mine if mine is not None else theirs
                        for mine, theirs in zip(self.astuple(), defaults.astuple(), strict=True)))

    def astuple(self) -> tuple[int | None, int | None, int | None]:
        return (self.max_runs, self.max_queued, self.max_adapters)


class AuditAction(StrEnum):
    ALIAS_SET = "alias.set"
    ALIAS_ROLLBACK = "alias.rollback"
    POLICY_DELETE = "policy.delete"
    REVISION_DELETE = "revision.delete"
    KEY_CREATE = "key.create"
    KEY_REVOKE = "key.revoke"
    TENANT_DELETE = "tenant.delete"


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One recorded change (append-only): who did what to which object of `tenant`, when, and
    from what to what (alias moves: revision ids; keys: the key's prefix)."""

    id: int
    at: datetime
    actor: str
    tenant: str
    action: str  # an AuditAction
    target: str  # owner/name:alias, owner/name, owner/name@rev_..., key_..., tenant name
    from_value: str | None
    to_value: str | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class AliasEvent:
    """One move of an alias; the history is append-only."""

    policy: str
    alias: str
    seq: int  # 1, 2, 3 ... per alias
    action: str  # "set" | "rollback"
    from_revision_id: RevisionId | None
    to_revision_id: RevisionId
    actor: str
    reason: str | None
    at: datetime


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Scores one revision got on one suite."""

    id: int
    revision_id: RevisionId
    suite: str
    metrics: dict[str, float]
    details: dict[str, object]
    created_by: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class MetricDelta:
    suite: str
    metric: str
    a: float | None
    b: float | None

    @property
    def delta(self) -> float | None:
        return None if self.a is None or self.b is None else self.b - self.a


@dataclass(frozen=True, slots=True)
class Comparison:
    """Metrics of two revisions side by side (latest evaluation per suite)."""

    a: RevisionId
    b: RevisionId
    rows: tuple[MetricDelta, ...]


@dataclass(frozen=True, slots=True)
class Lineage:
    """Revisions before and after one revision, across branches (nearest first)."""

    revision: Revision
    ancestors: tuple[Revision, ...]
    descendants: tuple[Revision, ...]


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: tuple[T, ...]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class GcReport:
    expired_revisions_deleted: int
    expired_revisions_kept: int  # expired but still pointed at by an alias
    blobs_deleted: int
    bytes_freed: int
    tmp_files_deleted: int


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What `check()` found; `ok` means every row has complete, hash-matching blobs."""

    revisions_checked: int
    problems: tuple[str, ...]
    unreferenced_blobs: int

    @property
    def ok(self) -> bool:
        return not self.problems
