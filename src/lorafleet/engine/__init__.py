"""The resident-base worker: batched multi-adapter training and sampling.

`Engine` computes (forward_backward, optim_step, the reference whole-batch `sample`);
`engine.scheduler.Scheduler` drives it from two compute lanes (training, decoding) with typed jobs
(`engine.jobs`), continuous batching (`engine.decode`), training micro-batches
(`engine.training`), adapter slots (`engine.slots`) and residency (`engine.residency`).
Nothing here imports the API layer.
"""

from lorafleet.engine.engine import Engine
from lorafleet.engine.types import SampledSequence, SampleRequest, SampleResult, SamplingParams

__all__ = ["Engine", "SampleRequest", "SampleResult", "SampledSequence", "SamplingParams"]
