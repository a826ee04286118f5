"""Tinker wire formats <-> plain records: protobuf (SDK >= 0.25) and JSON (SDK <= 0.24).

Only this module knows the byte layouts of the Tinker protocol (see
reference/tinker_protocol.md §6.3, §6.4, §7.3, §7.4). It uses the message classes the `tinker`
package ships (`tinker.proto.tinker_public_pb2`), so the schema cannot drift from the SDK.
Everything here is pure: bytes or dicts in, numpy-backed records out (and back). Malformed
input (including NaN/inf numbers and NUL characters) raises `InvalidRequest` naming the
offending field; nothing here touches the engine.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from tinker.proto import tinker_public_pb2 as pb

from lorafleet.api.checks import check_text, finite
from lorafleet.errors import InvalidRequest

# Proto dtype enum -> numpy dtype accepted in requests. bf16/int32 are accepted for
# robustness (the SDK only writes float32/int64) and widened on decode.
_REQUEST_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_BFLOAT16: np.dtype("<u2"),
}
_NUMPY_TO_PROTO: dict[str, int] = {"float32": pb.DTYPE_FLOAT32, "int64": pb.DTYPE_INT64}
# Loss inputs that carry token ids; every other input is real-valued.
INT_INPUTS = frozenset({"target_tokens"})
MAX_DATUM_TOKENS = 1 << 20
# Values a request's loss inputs may hold once decoded: what a 64 MiB body carries densely.
# Sparse CSR tensors are checked against it *before* they are densified (a 98-byte body can
# declare shape [3, 2e8]).
MAX_REQUEST_VALUES = 1 << 24
MAX_TOKEN_ID = (1 << 31) - 1  # token ids travel as int32 (proto encoded_text)
MAX_SEQ_ID = (1 << 63) - 1
MASK_LOGPROB = -99999.0  # the SDK's TopkLogprobs sentinel: (token 0, this logprob) = not scored


@dataclass(slots=True)
class WireDatum:
    """One training example as it came off the wire.

    Args:
        tokens: int64 [N], the concatenation of the datum's text chunks.
        inputs: loss inputs by name; int64 for token ids, float32 otherwise; leading dim N.
    """

    tokens: np.ndarray
    inputs: dict[str, np.ndarray]


@dataclass(slots=True)
class FwdBwdCall:
    """A decoded forward_backward / forward request (one SDK chunk)."""

    model_id: str
    seq_id: int
    loss_fn: str
    loss_config: dict[str, float]
    forward_only: bool
    data: list[WireDatum]
    fingerprint: str = ""


TopK = list[tuple[int, float]]  # (token id, logprob), most likely first
MASK_LOGPROB = -99999.0  # the SDK's sentinel of an empty top-k cell (tinker.types.topk_logprobs)


@dataclass(slots=True)
class SampledSeq:
    """One generated sequence: tokens, one logprob per token, 'stop' or 'length', and with
    topk_sample_logprobs the top k of every position."""

    tokens: list[int]
    logprobs: list[float]
    stop_reason: str
    topk: list[TopK] | None = None


@dataclass(slots=True)
class TargetIds:
    """`SampleRequest.target_prompt_logprobs`: int64 [len(prompt) - 1, K] token ids (-1 = no
    cell), and the CSR layout it came in (None: dense), which the answer keeps."""

    ids: np.ndarray
    crow: np.ndarray | None = None
    col: np.ndarray | None = None


@dataclass(slots=True)
class SampleOutcome:
    """The result of one asample request (num_samples sequences) and its prompt scores:
    top-k ids / logprobs [P, k] (sentinel rows where not scored), the logprobs of the
    requested target ids [P - 1, K] (in the request's layout), the alternative draws
    (tokens, logprobs) [P - 1, k]."""

    sequences: list[SampledSeq]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt: tuple[np.ndarray, np.ndarray] | None = None
    target_prompt: tuple[TargetIds, np.ndarray] | None = None
    alt_tokens: tuple[np.ndarray, np.ndarray] | None = None


@dataclass(slots=True)
class FwdBwdOutcome:
    """Per-datum output arrays (float32 [N] each) and scalar metrics of one chunk."""

    outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- requests (proto)


def decode_forward_backward(body: bytes, forward_only: bool | None = None) -> FwdBwdCall:
    """Parse a protobuf `ForwardBackwardRequest` body and check its tensors.

    `forward_only` overrides the message flag (the /forward route of old SDKs).
    """
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as e:
        raise InvalidRequest(f"malformed protobuf ForwardBackwardRequest: {e}") from e
    config = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        if value.WhichOneof("value") == "text":
            raise InvalidRequest(f"loss_fn_config[{key!r}]: string values are not supported")
        config[key] = float(value.number)
    budget = _Budget()
    data = [_decode_datum(d, i, budget) for i, d in enumerate(msg.data)]
    call = FwdBwdCall(
        model_id=msg.model_id,
        seq_id=seq_id(msg.seq_id),
        loss_fn=msg.loss_fn,
        loss_config=config,
        forward_only=bool(msg.forward_only) if forward_only is None else forward_only,
        data=data,
        fingerprint=hashlib.sha256(msg.SerializeToString(deterministic=True)).hexdigest(),
    )
    return check_call(call)


class _Budget:
    """Counts the values a request decodes, refusing (before allocating) past the limit."""

    def __init__(self, limit: int = MAX_REQUEST_VALUES) -> None:
        self.left = limit
        self.limit = limit

    def take(self, shape: list[int], where: str) -> None:
        if any(s < 0 for s in shape):
            raise InvalidRequest(f"{where}: negative dimension in shape {shape}")
        n = math.prod(shape)
        if n > self.left:
            raise InvalidRequest(f"{where}: shape {shape} holds {n} values; a request's loss "
                                 f"inputs may hold at most {self.limit} in all")
        self.left -= n


def seq_id(value: Any, where: str = "seq_id") -> int:
    """A seq_id: an integer in [0, 2^63)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ_ID:
        raise InvalidRequest(f"{where} must be an integer in [0, 2^63), got {value!r}")
    return value


def _decode_datum(d: pb.Datum, index: int, budget: _Budget) -> WireDatum:
    parts: list[np.ndarray] = []
    for chunk in d.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise InvalidRequest(f"data[{index}]: {kind or 'empty'} chunks are not supported")
        raw = chunk.encoded_text.tokens
        if len(raw) % 4:
            raise InvalidRequest(f"data[{index}]: encoded_text.tokens is not int32 bytes")
        parts.append(np.frombuffer(raw, dtype="<i4").astype(np.int64))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    inputs = {name: _decode_tensor(t, f"data[{index}].{name}", budget)
              for name, t in d.loss_fn_inputs.items()}
    return WireDatum(tokens=tokens, inputs=inputs)


def _decode_tensor(t: pb.Tensor, where: str, budget: _Budget) -> np.ndarray:
    dtype = _REQUEST_DTYPES.get(t.dtype)
    if dtype is None:
        raise InvalidRequest(f"{where}: unsupported dtype enum {t.dtype}")
    shape = [int(s) for s in t.shape]
    kind = t.WhichOneof("encoding")
    if kind == "sparse_csr":
        if len(shape) != 2:
            raise InvalidRequest(f"{where}: sparse tensors need a 2-D shape, got {shape}")
        budget.take(shape, where)
        arr = _csr_to_dense(t.sparse_csr, dtype, shape, where)
    else:
        raw = t.dense if kind == "dense" else b""
        if len(raw) % dtype.itemsize:
            raise InvalidRequest(f"{where}: {len(raw)} bytes is not a multiple of {dtype}")
        flat = np.frombuffer(raw, dtype=dtype)
        if not shape:
            shape = [flat.size]
        budget.take(shape, where)
        if math.prod(shape) != flat.size:
            raise InvalidRequest(f"{where}: shape {shape} does not match {flat.size} values")
        arr = flat.reshape(shape)
    return _widen(arr, t.dtype)


def _csr_to_dense(csr: pb.SparseCsr, dtype: np.dtype, shape: list[int], where: str) -> np.ndarray:
    values = np.frombuffer(csr.values, dtype=dtype)
    crow = np.frombuffer(csr.crow_indices, dtype="<i8")
    col = np.frombuffer(csr.col_indices, dtype="<i8")
    rows, cols = shape
    if crow.size != rows + 1 or col.size != values.size or (crow.size and crow[-1] != values.size):
        raise InvalidRequest(f"{where}: inconsistent sparse CSR indices")
    if col.size and (col.min() < 0 or col.max() >= cols) or np.any(np.diff(crow) < 0):
        raise InvalidRequest(f"{where}: sparse CSR indices out of range")
    dense = np.zeros((rows, cols), dtype=dtype)
    row_of = np.repeat(np.arange(rows), np.diff(crow))
    dense[row_of, col] = values
    return dense


def _widen(arr: np.ndarray, proto_dtype: int) -> np.ndarray:
    if proto_dtype == pb.DTYPE_BFLOAT16:
        return (arr.astype(np.uint32) << 16).view(np.float32)
    if proto_dtype == pb.DTYPE_INT32:
        return arr.astype(np.int64)
    return arr.astype(arr.dtype.newbyteorder("="), copy=True)


def check_call(call: FwdBwdCall) -> FwdBwdCall:
    """Check what can be checked without the model: non-empty data, aligned shapes, dtypes,
    finite loss_fn_config values, no NUL in names."""
    if not call.model_id:
        raise InvalidRequest("model_id is required")
    if not call.loss_fn:
        raise InvalidRequest("loss_fn is required")
    check_text(call.model_id, "model_id")
    check_text(call.loss_fn, "loss_fn")
    for key, value in call.loss_config.items():
        finite(value, f"loss_fn_config[{check_text(key, 'loss_fn_config key')!r}]")
    if not call.data:
        raise InvalidRequest("data is empty: forward_backward needs at least one datum")
    for i, d in enumerate(call.data):
        n = d.tokens.size
        if n == 0:
            raise InvalidRequest(f"data[{i}]: model_input has no tokens")
        if n > MAX_DATUM_TOKENS:
            raise InvalidRequest(f"data[{i}]: {n} tokens is more than {MAX_DATUM_TOKENS}")
        if d.tokens.min() < 0:
            raise InvalidRequest(f"data[{i}]: negative token id {int(d.tokens.min())}")
        for name, arr in d.inputs.items():
            if arr.ndim == 0 or arr.shape[0] != n:
                raise InvalidRequest(
                    f"data[{i}].loss_fn_inputs[{name!r}] has shape {list(arr.shape)}; its "
                    f"leading dimension must equal the {n} input tokens"
                )
            if name in INT_INPUTS:
                if arr.dtype.kind != "i":
                    raise InvalidRequest(f"data[{i}].{name} must be int64, got {arr.dtype}")
            elif arr.dtype.kind != "f":
                raise InvalidRequest(f"data[{i}].{name} must be float32, got {arr.dtype}")
            elif not np.all(np.isfinite(arr)):
                raise InvalidRequest(f"data[{i}].{name} contains NaN or infinity")
    return call


# ---------------------------------------------------------------- requests (JSON, SDK <= 0.24)


def decode_forward_backward_json(body: dict[str, Any], forward_only: bool) -> FwdBwdCall:
    """Parse the JSON form (`{"forward_backward_input": {...}, "model_id", "seq_id"}`)."""
    fb = body.get("forward_backward_input") or body.get("forward_input")
    if not isinstance(fb, dict):
        raise InvalidRequest("forward_backward_input is required")
    budget = _Budget()
    data = [_json_datum(d, i, budget) for i, d in enumerate(fb.get("data") or [])]
    config = fb.get("loss_fn_config") or {}
    try:
        config = {str(k): float(v) for k, v in config.items()}
    except (TypeError, ValueError, AttributeError) as e:
        raise InvalidRequest(f"loss_fn_config must map names to numbers: {e}") from e
    call = FwdBwdCall(
        model_id=str(body.get("model_id") or ""),
        seq_id=seq_id(body.get("seq_id") or 0),
        loss_fn=str(fb.get("loss_fn") or "cross_entropy"),
        loss_config=config,
        forward_only=forward_only,
        data=data,
        fingerprint=hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest(),
    )
    return check_call(call)


def _json_datum(d: Any, i: int, budget: _Budget) -> WireDatum:
    if not isinstance(d, dict):
        raise InvalidRequest(f"data[{i}] must be an object")
    tokens = np.asarray(model_input_tokens(d.get("model_input"), f"data[{i}].model_input"),
                        dtype=np.int64)
    inputs: dict[str, np.ndarray] = {}
    loss_inputs = d.get("loss_fn_inputs") or {}
    if not isinstance(loss_inputs, dict):
        raise InvalidRequest(f"data[{i}].loss_fn_inputs must be an object")
    for name, td in loss_inputs.items():
        inputs[name] = tensor_data_from_json(td, f"data[{i}].{name}")
        budget.take(list(inputs[name].shape), f"data[{i}].{name}")
    return WireDatum(tokens=tokens, inputs=inputs)


def tensor_data_from_json(td: Any, where: str) -> np.ndarray:
    """Decode the SDK's JSON `TensorData` ({data, dtype, shape}) into an array."""
    if not isinstance(td, dict) or "data" not in td:
        raise InvalidRequest(f"{where}: expected a TensorData object")
    dtype = {"float32": np.float32, "int64": np.int64}.get(td.get("dtype", "float32"))
    if dtype is None:
        raise InvalidRequest(f"{where}: unsupported dtype {td.get('dtype')!r}")
    try:
        arr = np.asarray(td["data"], dtype=dtype)
        shape = td.get("shape")
        return arr.reshape(shape) if shape else arr.reshape(-1)
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidRequest(f"{where}: {e}") from e


def target_ids_from_json(td: Any, rows: int, vocab: int, max_values: int = MAX_REQUEST_VALUES) -> TargetIds:
    """Decode `target_prompt_logprobs` (the SDK's JSON TensorData, dense or sparse CSR): int64
    token ids of shape [rows, K], -1 where nothing is asked."""
    where = "target_prompt_logprobs"
    if not isinstance(td, dict) or "data" not in td:
        raise InvalidRequest(f"{where}: expected a TensorData object")
    if td.get("dtype", "int64") != "int64":
        raise InvalidRequest(f"{where} must be an int64 tensor of token ids, got {td.get('dtype')!r}")
    shape = td.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(x, int) and x >= 0 for x in shape)):
        raise InvalidRequest(f"{where} must be 2-D, [len(prompt) - 1, K], got shape {shape!r}")
    if shape[0] != rows:
        raise InvalidRequest(f"{where} has {shape[0]} rows; the prompt has {rows + 1} tokens, so it needs "
                             f"{rows} (row i scores prompt position i + 1)")
    _Budget(max_values).take(shape, where)
    crow_in, col_in = td.get("sparse_crow_indices"), td.get("sparse_col_indices")
    try:
        values = np.asarray(td["data"], dtype=np.int64).reshape(-1)
        if crow_in is None and col_in is None:
            if values.size != shape[0] * shape[1]:
                raise InvalidRequest(f"{where}: shape {shape} does not match {values.size} values")
            ids, crow, col = values.reshape(shape), None, None
        else:
            crow, col = np.asarray(crow_in, dtype=np.int64), np.asarray(col_in, dtype=np.int64)
            if crow.size != shape[0] + 1 or col.size != values.size or crow[0] != 0 or crow[-1] != values.size \
                    or np.any(np.diff(crow) < 0) or (col.size and (col.min() < 0 or col.max() >= shape[1])):
                raise InvalidRequest(f"{where}: inconsistent sparse CSR indices")
            ids = np.full(shape, -1, dtype=np.int64)
            ids[np.repeat(np.arange(shape[0]), np.diff(crow)), col] = values
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidRequest(f"{where}: {e}") from e
    bad = ids[(ids < -1) | (ids >= vocab)]
    if bad.size:
        raise InvalidRequest(f"{where}: token id {int(bad[0])} is outside the vocabulary (size {vocab}); "
                             "use -1 for cells that ask nothing")
    return TargetIds(ids, crow, col)


def model_input_tokens(model_input: Any, where: str = "prompt") -> list[int]:
    """Concatenate the token ids of a JSON ModelInput (`{"chunks": [...]}`)."""
    if not isinstance(model_input, dict) or not isinstance(model_input.get("chunks"), list):
        raise InvalidRequest(f"{where}: expected {{'chunks': [...]}}")
    tokens: list[int] = []
    for j, chunk in enumerate(model_input["chunks"]):
        kind = chunk.get("type", "encoded_text") if isinstance(chunk, dict) else None
        if kind != "encoded_text":
            raise InvalidRequest(f"{where}.chunks[{j}]: {kind!r} chunks are not supported")
        toks = chunk.get("tokens")
        if not isinstance(toks, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_TOKEN_ID for t in toks):
            raise InvalidRequest(f"{where}.chunks[{j}].tokens must be integers in [0, 2^31)")
        tokens.extend(toks)
    return tokens


# ---------------------------------------------------------------- results (proto)


def is_finite(out: FwdBwdOutcome) -> bool:
    """True when every metric and real-valued output is finite (a diverged loss is not)."""
    return all(math.isfinite(v) for v in out.metrics.values()) and all(
        bool(np.isfinite(a).all()) for o in out.outputs for a in o.values() if a.dtype.kind == "f"
    )


def encode_forward_backward_output(out: FwdBwdOutcome) -> bytes:
    """Serialize per-datum outputs as batched `ArrayRecord`s (§6.4): one record per run of
    consecutive datums whose fields have the same trailing shapes (the SDK concatenates the
    records), so [N] outputs and [N, K] ones (2-D targets) can share one response."""
    msg = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for k, v in out.metrics.items():
        msg.metrics[k] = float(v)
    arrays = [{k: np.atleast_1d(np.asarray(v)) for k, v in o.items()} for o in out.outputs]
    if not arrays:
        msg.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=0)
    start = 0
    for end in range(1, len(arrays) + 1):
        if end < len(arrays) and _layout(arrays[end]) == _layout(arrays[start]):
            continue
        _add_record(msg, arrays[start:end])
        start = end
    return msg.SerializeToString()


def _layout(o: dict[str, np.ndarray]) -> tuple:
    return tuple(sorted((k, a.shape[1:], a.dtype.kind in "iu") for k, a in o.items()))


def _add_record(msg: Any, outputs: list[dict[str, np.ndarray]]) -> None:
    record = msg.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(outputs))
    for name in sorted(outputs[0]):
        arrays = [o[name] for o in outputs]
        dtype_name = "int64" if arrays[0].dtype.kind in "iu" else "float32"
        wire_dtype = np.dtype(dtype_name).newbyteorder("<")
        arrays = [np.ascontiguousarray(a, dtype=wire_dtype) for a in arrays]
        sizes = np.array([0] + [a.nbytes for a in arrays], dtype="<i8")
        bt = record.fields[name]
        bt.data = b"".join(a.tobytes() for a in arrays)
        bt.offsets = np.cumsum(sizes).astype("<i8").tobytes()
        bt.dtype = _NUMPY_TO_PROTO[dtype_name]
        bt.trailing_shape.extend(list(arrays[0].shape[1:]))


def encode_sample_response(out: SampleOutcome) -> bytes:
    """Serialize a SampleResponse (§7.4); prompt logprobs use NaN for 'not computed'."""
    msg = pb.SampleResponse()
    for s in out.sequences:
        seq = msg.sequences.add()
        seq.stop_reason = pb.STOP_REASON_STOP if s.stop_reason == "stop" else pb.STOP_REASON_LENGTH
        seq.tokens = np.asarray(s.tokens, dtype="<i4").tobytes()
        seq.logprobs = np.asarray(s.logprobs, dtype="<f4").tobytes()
        if s.topk is not None:
            _encode_topk(seq.topk_sampled_logprobs, s.topk)
    if out.prompt_logprobs is not None:
        vals = [math.nan if v is None else v for v in out.prompt_logprobs]
        msg.prompt_logprobs = np.asarray(vals, dtype="<f4").tobytes()
    if out.topk_prompt is not None:
        ids, lps = out.topk_prompt
        msg.topk_prompt_logprobs.token_ids = np.ascontiguousarray(ids, dtype="<i4").tobytes()
        msg.topk_prompt_logprobs.logprobs = np.ascontiguousarray(lps, dtype="<f4").tobytes()
        msg.topk_prompt_logprobs.length, msg.topk_prompt_logprobs.k = int(ids.shape[0]), int(ids.shape[1])
    if out.target_prompt is not None:
        target, lps = out.target_prompt
        _tensor_proto(msg.target_prompt_logprobs, lps.astype(np.float32), target)
    if out.alt_tokens is not None:
        tokens, lps = out.alt_tokens
        _tensor_proto(msg.prompt_alt_tokens.tokens, tokens.astype(np.int64))
        _tensor_proto(msg.prompt_alt_tokens.logprobs, lps.astype(np.float32))
    return msg.SerializeToString()


def _encode_topk(msg: pb.TopkLogprobs, rows: list[TopK | None]) -> None:
    """Dense (length, k) int32 / float32 matrices; an empty cell (and a None row) is the SDK's
    sentinel (token 0, MASK_LOGPROB)."""
    k = max((len(r) for r in rows if r), default=0)
    ids = np.zeros((len(rows), k), dtype="<i4")
    lps = np.full((len(rows), k), MASK_LOGPROB, dtype="<f4")
    for i, row in enumerate(rows):
        for j, (t, v) in enumerate(row or []):
            ids[i, j], lps[i, j] = t, v
    msg.token_ids, msg.logprobs, msg.k, msg.length = ids.tobytes(), lps.tobytes(), k, len(rows)


def _tensor_proto(t: Any, dense: np.ndarray, layout: TargetIds | None = None) -> None:
    """Fill a proto `Tensor` with `dense` (float32 or int64), sparse CSR where `layout` was."""
    dtype_name = "int64" if dense.dtype.kind in "iu" else "float32"
    t.dtype = _NUMPY_TO_PROTO[dtype_name]
    t.shape.extend(list(dense.shape))
    wire_dtype = np.dtype(dtype_name).newbyteorder("<")
    if layout is not None and layout.crow is not None:
        rows = np.repeat(np.arange(dense.shape[0]), np.diff(layout.crow))
        t.sparse_csr.values = np.ascontiguousarray(dense[rows, layout.col], dtype=wire_dtype).tobytes()
        t.sparse_csr.crow_indices = layout.crow.astype("<i8").tobytes()
        t.sparse_csr.col_indices = layout.col.astype("<i8").tobytes()
    else:
        t.dense = np.ascontiguousarray(dense, dtype=wire_dtype).tobytes()


# ---------------------------------------------------------------- results (JSON, SDK <= 0.24)


def _tensor_json(arr: np.ndarray) -> dict[str, Any]:
    dtype = "int64" if arr.dtype.kind in "iu" else "float32"
    return {"data": arr.reshape(-1).tolist(), "dtype": dtype, "shape": list(arr.shape)}


def forward_backward_output_json(out: FwdBwdOutcome) -> dict[str, Any]:
    return {
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": [{k: _tensor_json(v) for k, v in o.items()} for o in out.outputs],
        "metrics": dict(out.metrics),
    }


def sample_response_json(out: SampleOutcome) -> dict[str, Any]:
    return {
        "type": "sample",
        "sequences": [
            {"tokens": s.tokens, "logprobs": s.logprobs, "stop_reason": s.stop_reason}
            for s in out.sequences
        ],
        "prompt_logprobs": out.prompt_logprobs,
        "topk_prompt_logprobs": None if out.topk_prompt is None else _topk_lists(*out.topk_prompt),
    }


def _topk_lists(ids: np.ndarray, lps: np.ndarray) -> list[list[tuple[int, float]] | None]:
    """The JSON form of top-k prompt logprobs: per position (id, logprob) pairs, or None."""
    rows: list[list[tuple[int, float]] | None] = []
    for r_ids, r_lps in zip(ids.tolist(), lps.tolist()):
        pairs = [(i, v) for i, v in zip(r_ids, r_lps) if not (i == 0 and v == MASK_LOGPROB)]
        rows.append(pairs or None)
    return rows


def fwdbwd_proto_to_json(payload: bytes) -> dict[str, Any]:
    """Re-encode a stored protobuf ForwardBackwardOutput for a JSON-era client."""
    msg = pb.ForwardBackwardOutput()
    msg.ParseFromString(payload)
    outputs: list[dict[str, np.ndarray]] = []
    for record in msg.loss_fn_outputs:
        base = len(outputs)
        outputs.extend({} for _ in range(record.num_datums))
        for name, bt in record.fields.items():
            dtype = np.dtype("<f4") if bt.dtype == pb.DTYPE_FLOAT32 else np.dtype("<i8")
            offsets = np.frombuffer(bt.offsets, dtype="<i8")
            buf = np.frombuffer(bt.data, dtype=dtype)
            trailing = list(bt.trailing_shape)
            for i in range(len(offsets) - 1):
                a = buf[offsets[i] // dtype.itemsize : offsets[i + 1] // dtype.itemsize]
                outputs[base + i][name] = a.reshape([-1, *trailing]) if trailing else a
    return forward_backward_output_json(
        FwdBwdOutcome(outputs=outputs, metrics=dict(msg.metrics))
    )


def sample_proto_to_json(payload: bytes) -> dict[str, Any]:
    msg = pb.SampleResponse()
    msg.ParseFromString(payload)
    seqs = [
        SampledSeq(
            tokens=np.frombuffer(s.tokens, dtype="<i4").tolist(),
            logprobs=np.frombuffer(s.logprobs, dtype="<f4").tolist(),
            stop_reason="stop" if s.stop_reason == pb.STOP_REASON_STOP else "length",
        )
        for s in msg.sequences
    ]
    plp = None
    if msg.prompt_logprobs:
        plp = [None if math.isnan(v) else v for v in np.frombuffer(msg.prompt_logprobs, "<f4").tolist()]
    topk = None
    if msg.HasField("topk_prompt_logprobs"):
        shape = (msg.topk_prompt_logprobs.length, msg.topk_prompt_logprobs.k)
        topk = (np.frombuffer(msg.topk_prompt_logprobs.token_ids, "<i4").reshape(shape),
                np.frombuffer(msg.topk_prompt_logprobs.logprobs, "<f4").reshape(shape))
    return sample_response_json(SampleOutcome(sequences=seqs, prompt_logprobs=plp, topk_prompt=topk))
