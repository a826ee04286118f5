"""Golden tests: our wire codec against the tinker SDK's own converters (request_conv / response_conv)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tinker import types
from tinker.proto import request_conv, response_conv

from lorafleet.api.tinker import wire
from lorafleet.errors import InvalidRequest


def _sdk_request(data, loss_fn="cross_entropy", config=None, seq_id=3):
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=data, loss_fn=loss_fn, loss_fn_config=config
        ),
        model_id="s:train:0",
        seq_id=seq_id,
    )
    return request_conv.forward_backward_request_to_proto(req).SerializeToString()


def _datum(tokens, n_chunks=1, **inputs):
    size = max(1, len(tokens) // n_chunks)
    chunks = [
        types.EncodedTextChunk(tokens=tokens[i : i + size]) for i in range(0, len(tokens), size)
    ]
    return types.Datum(
        model_input=types.ModelInput(chunks=chunks),
        loss_fn_inputs={k: types.TensorData.from_numpy(np.asarray(v)) for k, v in inputs.items()},
    )


def test_decode_sdk_forward_backward_concatenates_chunks_and_keeps_tensors():
    toks = [5, 6, 7, 8, 9, 10]
    d = _datum(toks, n_chunks=3, target_tokens=np.arange(6, dtype=np.int64),
               weights=np.linspace(0, 1, 6, dtype=np.float32))
    call = wire.decode_forward_backward(_sdk_request([d, d], "ppo", {"clip_low_threshold": 0.7}))
    assert call.model_id == "s:train:0" and call.seq_id == 3 and call.loss_fn == "ppo"
    assert call.loss_config == {"clip_low_threshold": 0.7}
    assert len(call.data) == 2
    assert call.data[0].tokens.tolist() == toks and call.data[0].tokens.dtype == np.int64
    assert call.data[0].inputs["target_tokens"].dtype == np.int64
    np.testing.assert_allclose(call.data[1].inputs["weights"], np.linspace(0, 1, 6))
    assert not call.forward_only
    again = wire.decode_forward_backward(_sdk_request([d, d], "ppo", {"clip_low_threshold": 0.7}))
    assert again.fingerprint == call.fingerprint


def test_decode_sparse_2d_inputs():
    import torch

    tt = torch.zeros(4, 3, dtype=torch.int64)
    tt[1, 2] = 7
    w = torch.zeros(4, 3)
    w[1, 2] = 0.5
    d = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={"target_tokens": types.TensorData.from_torch_sparse(tt)
                        if hasattr(types.TensorData, "from_torch_sparse")
                        else types.TensorData.from_torch(tt),
                        "weights": types.TensorData.from_torch(w)},
    )
    call = wire.decode_forward_backward(_sdk_request([d]))
    assert call.data[0].inputs["target_tokens"].shape == (4, 3)
    assert call.data[0].inputs["target_tokens"][1, 2] == 7
    assert call.data[0].inputs["weights"][1, 2] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "body, match",
    [
        (b"\xff\xff\xff", "malformed protobuf"),
        (b"", "model_id is required"),
    ],
)
def test_malformed_protobuf_is_invalid_request(body, match):
    with pytest.raises(InvalidRequest, match=match):
        wire.decode_forward_backward(body)


def test_misaligned_and_mistyped_inputs_are_rejected():
    bad_len = _datum([1, 2, 3], target_tokens=np.arange(2), weights=np.ones(3, np.float32))
    with pytest.raises(InvalidRequest, match="leading dimension"):
        wire.decode_forward_backward(_sdk_request([bad_len]))
    bad_type = _datum([1, 2, 3], target_tokens=np.ones(3, np.float32), weights=np.ones(3, np.float32))
    with pytest.raises(InvalidRequest, match="must be int64"):
        wire.decode_forward_backward(_sdk_request([bad_type]))
    with pytest.raises(InvalidRequest, match="data is empty"):
        wire.decode_forward_backward(_sdk_request([]))


def test_forward_backward_output_roundtrips_through_sdk_decoder():
    outs = [
        {"logprobs": np.array([-1.0, -2.0, -3.0], np.float32),
         "elementwise_loss": np.array([1.0, 2.0, 3.0], np.float32)},
        {"logprobs": np.array([-0.5], np.float32), "elementwise_loss": np.array([0.5], np.float32)},
    ]
    payload = wire.encode_forward_backward_output(
        wire.FwdBwdOutcome(outputs=outs, metrics={"loss:sum": 6.5})
    )
    res = response_conv.deserialize_forward_backward_output(payload)
    assert res.metrics == {"loss:sum": 6.5}
    assert len(res.loss_fn_outputs) == 2
    assert res.loss_fn_outputs[0]["logprobs"].tolist() == [-1.0, -2.0, -3.0]
    assert res.loss_fn_outputs[1]["elementwise_loss"].shape == [1]
    js = wire.fwdbwd_proto_to_json(payload)
    assert js["loss_fn_outputs"][0]["logprobs"]["data"] == [-1.0, -2.0, -3.0]


def test_sample_response_roundtrips_through_sdk_decoder():
    out = wire.SampleOutcome(
        sequences=[wire.SampledSeq([4, 5, 2], [-0.1, -0.2, -0.3], "stop"),
                   wire.SampledSeq([7], [-1.5], "length")],
        prompt_logprobs=[None, -2.0, -3.0],
    )
    res = response_conv.deserialize_sample_response(wire.encode_sample_response(out))
    assert [s.tokens for s in res.sequences] == [[4, 5, 2], [7]]
    assert [s.stop_reason for s in res.sequences] == ["stop", "length"]
    assert res.sequences[0].logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert res.prompt_logprobs[0] is None and res.prompt_logprobs[2] == pytest.approx(-3.0)
    js = wire.sample_proto_to_json(wire.encode_sample_response(out))
    assert js["sequences"][1]["stop_reason"] == "length" and js["prompt_logprobs"][0] is None


def test_json_model_input_and_forward_backward_json():
    assert wire.model_input_tokens({"chunks": [{"tokens": [1, 2], "type": "encoded_text"},
                                               {"tokens": [3]}]}) == [1, 2, 3]
    with pytest.raises(InvalidRequest):
        wire.model_input_tokens({"chunks": [{"type": "image", "data": "xx"}]})
    d = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
         "loss_fn_inputs": {"target_tokens": {"data": [1, 2, 3], "dtype": "int64", "shape": [3]},
                            "weights": {"data": [1, 1, 1], "dtype": "float32", "shape": [3]}}}
    body = {"model_id": "m", "seq_id": 1, "forward_backward_input": {
        "data": [d], "loss_fn": "cross_entropy"}}
    call = wire.decode_forward_backward_json(body, forward_only=False)
    assert call.data[0].tokens.tolist() == [1, 2, 3]
    assert call.data[0].inputs["weights"].dtype == np.float32
    assert math.isclose(float(call.data[0].inputs["weights"].sum()), 3.0)
