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

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from lorafleet.api.checks import check_json
from lorafleet.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)
MAX_TTL_S = 100 * 365 * 86400
FLOAT32_MAX = 3.4028234663852886e38
# a checkpoint's retention: 0 or None keep it until deleted
TtlSeconds = Annotated[int, Field(ge=0, le=MAX_TTL_S)]

MAX_JSON_DEPTH = 64  # nesting of a request body; deeper is refused before anything recurses on it
MAX_METADATA_BYTES = 64 << 10  # stored free-form fields (user_metadata, tags), as JSON

# Integers that end up in SQLite/PostgreSQL BIGINT columns or in proto int64 fields.
SeqId = Annotated[int, Field(ge=0, le=(1 << 63) - 1)]
Count = Annotated[int, Field(ge=0, le=(1 << 31) - 1)]


def _small(value: Any) -> Any:
    size = len(json.dumps(value))
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"{size} bytes of JSON is over the limit of {MAX_METADATA_BYTES}")
    return value


Metadata = Annotated[dict[str, Any] | None, AfterValidator(_small)]
Tags = Annotated[list[str], AfterValidator(_small)]
Name = Annotated[str | None, Field(max_length=1024)]


class Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False)


def parse_json(body: bytes) -> dict[str, Any]:
    """Decode a JSON object body; malformed JSON, a non-finite number or a NUL character
    anywhere in it is an `InvalidRequest`."""
    try:
        data = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidRequest(f"malformed JSON body: {e}") from e
    except RecursionError as e:
        raise InvalidRequest(f"JSON body nested deeper than {MAX_JSON_DEPTH} levels") from e
    if not isinstance(data, dict):
        raise InvalidRequest("the JSON body must be an object")
    _check_depth(data)
    check_json(data)
    return data


def _check_depth(data: Any) -> None:
    """Iteratively: a body that parsed can still be too deep for what recurses on it later."""
    level = [data]
    for _ in range(MAX_JSON_DEPTH):
        level = [c for x in level for c in (x.values() if isinstance(x, dict) else x)
                 if isinstance(c, (dict, list))]
        if not level:
            return
    raise InvalidRequest(f"JSON body nested deeper than {MAX_JSON_DEPTH} levels")


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
    tags: Tags = []
    user_metadata: Metadata = None
    sdk_version: Name = None
    project_id: Name = None
    display_name: Name = None


class SessionRef(Wire):
    session_id: str


class FinishRequest(Wire):
    reason: dict[str, Any] | None = None
    detail: str | None = None


class LoraConfig(Wire):
    rank: int = Field(default=32, ge=1, le=1024)
    seed: Count | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModelRequest(Wire):
    session_id: str
    model_seq_id: SeqId = 0
    base_model: str
    user_metadata: Metadata = None
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
    seq_id: SeqId | None = None
    adam_params: AdamParams | None = None
    optimizer_params: dict[str, Any] | None = None


class SaveWeightsRequest(Wire):
    model_id: str
    path: str | None = None
    seq_id: SeqId | None = None
    ttl_seconds: TtlSeconds | None = None
    overwrite: bool = False
    user_metadata: Annotated[dict[str, str] | None, AfterValidator(_small)] = None


class SaveWeightsForSamplerRequest(SaveWeightsRequest):
    sampling_session_seq_id: SeqId | None = None
    kind: str | None = None


class SaveWeightsExternalRequest(SaveWeightsRequest):
    age_encryption_recipients: list[str] | None = None


class LoadWeightsRequest(Wire):
    path: str
    optimizer: bool = False
    model_id: str | None = None
    seq_id: SeqId | None = None
    session_id: str | None = None
    model_seq_id: SeqId | None = None
    base_model: str | None = None
    user_metadata: Metadata = None
    optimizer_config: dict[str, Any] | None = None


class CreateSamplingSessionRequest(Wire):
    session_id: str
    sampling_session_seq_id: SeqId = 0
    base_model: str | None = None
    model_path: str | None = None


class SamplingParams(Wire):
    max_tokens: Count | None = None
    seed: SeqId | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(default=1.0, ge=0)
    top_k: Annotated[int, Field(ge=-1, le=(1 << 31) - 1)] = -1  # -1 or 0: off
    top_p: float = Field(default=1.0, gt=0, le=1)


class SampleRequest(Wire):
    num_samples: Count = 1
    prompt: dict[str, Any]
    sampling_params: SamplingParams
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: SeqId | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: Count = 0
    topk_sample_logprobs: Count = 0
    target_prompt_logprobs: Any = None
    prompt_alt_tokens_k: Count = 0
    prompt_logprobs_last_n: Count | None = None
    record_stability_info: bool | None = None


class RetrieveFutureRequest(Wire):
    request_id: str
    allow_metadata_only: bool = False


class TtlRequest(Wire):
    ttl_seconds: TtlSeconds | None = None


class WeightsInfoRequest(Wire):
    tinker_path: str
