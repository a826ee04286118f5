"""The resident-base worker: batched multi-adapter training and sampling."""

from lorafleet.engine.engine import Engine
from lorafleet.engine.types import SampledSequence, SampleRequest, SampleResult, SamplingParams

__all__ = ["Engine", "SampleRequest", "SampleResult", "SampledSequence", "SamplingParams"]
