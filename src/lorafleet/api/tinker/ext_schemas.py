"""Request bodies of the calls added after the core Tinker protocol: SDK 0.38's session and
copy calls, and MinT's extensions (`/api/v1/mint/...`, `train_step`). Parsed with
`schemas.parse` like every Tinker body (unknown fields ignored, non-finite numbers refused)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError, field_validator

from lorafleet.api.tinker.schemas import AdamParams, Name, SeqId, Wire
from lorafleet.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)
MAX_SOURCES = 16  # adapters one interpolation may combine
MAX_COEFFICIENT = 1e6


class CopyWeightsRequest(Wire):
    source_path: str = Field(max_length=1024)
    session_id: str | None = None
    model_seq_id: SeqId | None = None
    destination_project_id: Name = None
    ttl_seconds: int | None = None
    weights_access_token: str | None = None


class ProjectRequest(Wire):
    project_id: Name = None


class SessionSearchCursor(Wire):
    last_created_at: datetime
    last_session_id: str


class SessionSearchRequest(Wire):
    session_id: str | None = None
    project_ids: list[str] | None = None
    user_metadata: dict[str, str] = {}
    display_name: str | None = Field(default=None, min_length=1, max_length=1024)
    owner: dict[str, Any] = {"type": "own"}
    statuses: list[dict[str, Any]] | None = Field(default=None, min_length=1)
    limit: int = Field(default=50, ge=1, le=200)
    cursor: SessionSearchCursor | None = None

    @field_validator("owner")
    @classmethod
    def _owner(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v.get("type") not in ("own", "accessible", "user"):
            raise ValueError("owner.type must be own, accessible or user")
        if v["type"] == "user" and not (isinstance(v.get("owner_urns"), list) and 1 <= len(v["owner_urns"]) <= 10):
            raise ValueError("owner.owner_urns must list 1 to 10 owners")
        return v

    @field_validator("statuses")
    @classmethod
    def _statuses(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for q in v or ():
            if q.get("type") not in ("active", "cancelled", "failed", "client_finished"):
                raise ValueError(f"unknown status {q.get('type')!r}: use active, cancelled, failed "
                                 "or client_finished")
        return v


class InterpolateRequest(Wire):
    """MinT `mint_interpolate_checkpoints`: a new sampler checkpoint sum_i c_i * delta_i."""

    source_paths: list[str] = Field(min_length=1, max_length=MAX_SOURCES)
    coefficients: list[float] = Field(min_length=1, max_length=MAX_SOURCES)
    output_path: Name = None
    output_checkpoint_type: Literal["sampler"] = "sampler"
    target_rank: int | None = Field(default=None, ge=1, le=1024)  # SVD re-projection
    policy: Name = None  # the catalog policy of the result (default: one of its own run)

    @field_validator("coefficients")
    @classmethod
    def _coefficients(cls, v: list[float]) -> list[float]:
        bad = [c for c in v if abs(c) > MAX_COEFFICIENT]
        if bad:
            raise ValueError(f"coefficients must lie within +-{MAX_COEFFICIENT:g}, got {bad[0]}")
        if not any(v):
            raise ValueError("at least one coefficient must be non-zero")
        return v


class TrainStepRequest(Wire):
    model_id: str
    seq_id: SeqId | None = None
    forward_backward_input: dict[str, Any]
    adam_params: AdamParams | None = None


class ReverseKLDatum(Wire):
    """One on-policy sequence: the student's tokens and the reference's view of the same
    completion; tensors in the SDK's JSON TensorData form ({data, dtype, shape})."""

    student_input: dict[str, Any]
    reference_input: dict[str, Any]
    target_tokens: dict[str, Any]
    weights: dict[str, Any]
    old_logprobs: dict[str, Any] | None = None  # the student's sampling logprobs (required)
    reference_logprobs: dict[str, Any] | None = None  # given: no reference pass for this datum


class ReverseKLRequest(Wire):
    """MinT `mint_forward_backward_reverse_kl`."""

    model_id: str
    reference_model_path: str = Field(max_length=1024)
    data: list[ReverseKLDatum] = Field(min_length=1, max_length=1024)
    temperature: float = Field(default=1.0, gt=0, le=100)
    seq_id: SeqId | None = None


def validate(model: type[M], data: dict[str, Any]) -> M:
    """An already decoded body as `model`; a failed validation is an InvalidRequest naming
    each field, as `schemas.parse` words it."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                             for err in e.errors())
        raise InvalidRequest(f"invalid {model.__name__}: {problems}") from e
