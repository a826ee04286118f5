"""Pydantic models of the Tinker JSON requests we accept (SDK 0.22-0.38).

Only `api/tinker` imports these. Unknown fields are ignored (newer SDKs add fields), and
`parse` turns malformed JSON or a failed validation into `InvalidRequest` (HTTP 400), so
the status-code policy stays in `api/errors.py`. Every body is checked by `parse_json` for
non-finite numbers and NUL characters (`api/checks.py`); float fields refuse NaN/inf also
when sent as strings, and hyper-parameters carry their ranges here.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafleet.api.checks import check_json
from lorafleet.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)
MAX_TTL_S = 100 * 365 * 86400
FLOAT32_MAX = 3.4028234663852886e38
# a checkpoint's retention: 0 or None keep it until deleted
TtlSeconds = Annotated[int, Field(ge=0, le=MAX_TTL_S)]


class Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False)


def parse_json(body: bytes) -> dict[str, Any]:
    """Decode a JSON object body; malformed JSON, a non-finite number or a NUL character
    anywhere in it is an `InvalidRequest`."""
    try:
        data = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidRequest(f"malformed JSON body: {e}") from e
    if not isinstance(data, dict):
        raise InvalidRequest("the JSON body must be an object")
    check_json(data)
    return data


def parse(body: bytes, model: type[M]) -> M:
    """Decode a JSON body into `model`; any problem is an `InvalidRequest` with the reason."""
    data = parse_json(body)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()
        )
        raise InvalidRequest(f"invalid {model.__name__}: {problems}") from e


class ClientConfigRequest(Wire):
    sdk_version: str | None = None


class CreateSessionRequest(Wire):
    tags: list[str] = []
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: str | None = None


class SessionRef(Wire):
    session_id: str


class FinishRequest(Wire):
    reason: dict[str, Any] | None = None
    detail: str | None = None


class LoraConfig(Wire):
    rank: int = 32
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModelRequest(Wire):
    session_id: str
    model_seq_id: int = 0
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfig | None = None
    optimizer_config: dict[str, Any] | None = None


class ModelRef(Wire):
    model_id: str


class AdamParams(Wire):  # the optimizer computes in float32: larger values cannot be applied
    learning_rate: float = Field(default=1e-4, ge=0, le=FLOAT32_MAX)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-12, ge=0, le=FLOAT32_MAX)
    weight_decay: float = Field(default=0.0, ge=0, le=FLOAT32_MAX)
    grad_clip_norm: float = Field(default=0.0, ge=0, le=FLOAT32_MAX)


class OptimStepRequest(Wire):
    model_id: str
    seq_id: int | None = None
    adam_params: AdamParams | None = None
    optimizer_params: dict[str, Any] | None = None


class SaveWeightsRequest(Wire):
    model_id: str
    path: str | None = None
    seq_id: int | None = None
    ttl_seconds: TtlSeconds | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None


class SaveWeightsForSamplerRequest(SaveWeightsRequest):
    sampling_session_seq_id: int | None = None
    kind: str | None = None


class SaveWeightsExternalRequest(SaveWeightsRequest):
    age_encryption_recipients: list[str] | None = None


class LoadWeightsRequest(Wire):
    path: str
    optimizer: bool = False
    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None


class CreateSamplingSessionRequest(Wire):
    session_id: str
    sampling_session_seq_id: int = 0
    base_model: str | None = None
    model_path: str | None = None


class SamplingParams(Wire):
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(default=1.0, ge=0)
    top_k: int = Field(default=-1, ge=-1)  # -1 or 0: off
    top_p: float = Field(default=1.0, gt=0, le=1)


class SampleRequest(Wire):
    num_samples: int = 1
    prompt: dict[str, Any]
    sampling_params: SamplingParams
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: int | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: Any = None
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = None
    record_stability_info: bool | None = None


class RetrieveFutureRequest(Wire):
    request_id: str
    allow_metadata_only: bool = False


class TtlRequest(Wire):
    ttl_seconds: TtlSeconds | None = None


class WeightsInfoRequest(Wire):
    tinker_path: str
