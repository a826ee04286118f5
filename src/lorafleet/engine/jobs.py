"""Typed engine work: a `WorkKind`, one payload record per kind, and the sink results leave by.

The service layer (api/tinker, api/openai) validates a request once and builds a `Job` with
a typed payload; the scheduler (engine/scheduler.py) runs it and reports through the job's
`Sink`: `done(job, result)` or `failed(job, error)` exactly once, and `on_token` for every
token a sample job's rows choose (with its top-k logprobs when the request asked for them). The engine knows no wire format, future table or database:
what a result means to a client is the sink's business (api/tinker/jobs.py, api/openai).

Results per kind: CREATE_RUN / LOAD_RUN / LOAD_WEIGHTS / UNLOAD_RUN -> `RunState`;
FORWARD_BACKWARD -> `FwdBwdResult`; OPTIM_STEP -> `StepResult`; SAVE -> `Snapshot` (the
training lane only copies tensors; the sink writes files on the I/O worker); SAMPLE ->
list[SampleResult], one per request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from torch import Tensor

from lorafleet.engine.types import SampleRequest, TopLogprobs
from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.weights import LoraWeights
from lorafleet.train.types import AdamParams, Datum


class WorkKind(StrEnum):
    CREATE_RUN = "create_run"
    LOAD_RUN = "load_run"  # a new run from saved weights (and optimizer state)
    UNLOAD_RUN = "unload_run"
    FORWARD_BACKWARD = "forward_backward"
    OPTIM_STEP = "optim_step"
    SAVE = "save"
    LOAD_WEIGHTS = "load_weights"  # replace an existing run's weights, in its sequence
    SAMPLE = "sample"


UNORDERED = frozenset({WorkKind.CREATE_RUN, WorkKind.LOAD_RUN, WorkKind.UNLOAD_RUN})
BARRIERS = frozenset({WorkKind.OPTIM_STEP, WorkKind.SAVE, WorkKind.LOAD_WEIGHTS})


# ---------------------------------------------------------------------- payloads


@dataclass(frozen=True, slots=True)
class CreateRun:
    spec: LoraSpec
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class LoadRun:
    """A new run whose weights (and optionally Adam state) the service already read and parsed."""

    weights: LoraWeights
    optimizer: dict[str, Tensor] | None = None
    step: int = 0
    parent: str | None = None


@dataclass(frozen=True, slots=True)
class UnloadRun:
    reason: str = "its session ended"


@dataclass(frozen=True, slots=True)
class ForwardBackward:
    """Datums for one run; `fingerprint` digests them for the run's provenance."""

    data: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_config: dict[str, float] = field(default_factory=dict)
    forward_only: bool = False
    fingerprint: str = ""

    @property
    def tokens(self) -> int:
        return sum(int(d.tokens.numel()) for d in self.data)


@dataclass(frozen=True, slots=True)
class OptimStep:
    adam: AdamParams


@dataclass(frozen=True, slots=True)
class Save:
    """Snapshot the run's weights (and Adam state); `parent` becomes the run's new parent
    (the checkpoint path the sink writes), None leaves it."""

    with_optimizer: bool = False
    parent: str | None = None


@dataclass(frozen=True, slots=True)
class LoadWeights:
    weights: LoraWeights
    optimizer: dict[str, Tensor] | None = None
    step: int | None = None
    parent: str | None = None


@dataclass(frozen=True, slots=True)
class Sample:
    """Requests (their `adapter` field unused) on one adapter version.

    `lease` (engine/residency.py `Lease`) holds the adapter in host memory from submission
    until the scheduler releases it when the job ends; None samples the base alone.
    """

    requests: list[SampleRequest]
    lease: Any = None

    @property
    def key(self) -> Hashable | None:
        return None if self.lease is None else self.lease.key

    @property
    def rows(self) -> int:
        return sum(r.num_samples for r in self.requests)


Payload = CreateRun | LoadRun | UnloadRun | ForwardBackward | OptimStep | Save | LoadWeights | Sample


# ---------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class RunState:
    """What the engine knows of a run at a point of its sequence (provenance inputs)."""

    run_id: str
    spec: LoraSpec
    step: int
    parent: str | None
    batches_digest: str  # sha256 of the fingerprints trained on since the last save
    last_loss: dict[str, Any] | None
    last_adam: AdamParams | None


@dataclass(frozen=True, slots=True)
class StepResult:
    metrics: dict[str, float]
    state: RunState


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A copy of a run's tensors (CPU fp32), taken on the training lane."""

    weights: LoraWeights
    optimizer: dict[str, Tensor] | None
    state: RunState


# ---------------------------------------------------------------------- jobs and sinks


class Sink(Protocol):
    """Where a job's outcome goes. `done`/`failed` run on the scheduler's I/O worker (they may
    write files and databases); `on_token` runs on the decode lane and must be cheap."""

    def done(self, job: Job, result: Any) -> None: ...

    def failed(self, job: Job, error: Exception) -> None: ...

    def on_token(self, job: Job, request: int, sample: int, token: int, logprob: float,
                 top: TopLogprobs | None = None) -> None: ...


@dataclass(eq=False, slots=True)
class Job:
    """One unit of engine work. Training kinds name their run and (ordered kinds) a seq_id."""

    kind: WorkKind
    payload: Payload
    sink: Sink
    run_id: str | None = None
    seq_id: int | None = None
    tenant: str = ""
    tag: Any = None  # the sink's own reference (a future id, a request id)
    # an ordered job that runs right after this one, at the same seq_id, before anything else
    # of the run (a fused train_step: forward_backward, then its optim_step)
    then: Job | None = None
    submitted: float = field(default_factory=time.monotonic)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _answered: threading.Lock = field(default_factory=threading.Lock)  # taken once: answered

    def answer(self) -> bool:
        """Claim the right to report this job's outcome: True the first time only (atomic)."""
        return self._answered.acquire(blocking=False)

    def cancel(self) -> None:
        """The client went away: the scheduler frees the job's rows at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class NullSink:
    """A sink that drops everything (warm-up jobs, fire-and-forget unloads)."""

    def done(self, job: Job, result: Any) -> None:
        pass

    def failed(self, job: Job, error: Exception) -> None:
        pass

    def on_token(self, job: Job, request: int, sample: int, token: int, logprob: float,
                 top: TopLogprobs | None = None) -> None:
        pass
