"""Pydantic models of the Tinker JSON requests we accept (SDK 0.22-0.38).

Only `api/tinker` imports these. Unknown fields are ignored (newer SDKs add fields), and
`parse` turns malformed JSON or a failed validation into `InvalidRequest` (HTTP 400), so
the status-code policy stays in `api/errors.py`.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from lorafleet.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)


class Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


def parse_json(body: bytes) -> dict[str, Any]:
    """Decode a JSON object body; malformed JSON is an `InvalidRequest`."""
    try:
        data = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidRequest(f"malformed JSON body: {e}") from e
    if not isinstance(data, dict):
        raise InvalidRequest("the JSON body must be an object")
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


class AdamParams(Wire):
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


class OptimStepRequest(Wire):
    model_id: str
    seq_id: int | None = None
    adam_params: AdamParams | None = None
    optimizer_params: dict[str, Any] | None = None


class SaveWeightsRequest(Wire):
    model_id: str
    path: str | None = None
    seq_id: int | None = None
    ttl_seconds: int | None = None
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
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


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
    ttl_seconds: int | None = None


class WeightsInfoRequest(Wire):
    tinker_path: str
