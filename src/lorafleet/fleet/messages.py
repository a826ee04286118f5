"""What crosses the process boundary between the control plane and an engine actor.

Only the job/sink seam (engine/jobs.py) crosses it: a `WireJob` is a `Job` without its sink
(the sink stays in the control plane) and without its residency lease (each engine has its own
residency; the lease is taken again in the actor), plus the adapter weights when the control
plane holds them and the engine does not (a Tinker sampler version fresh from training). What
comes back is a `Report`: a batch of sink events and the engine's state at that moment.
Adapters and results move; base weights never do (each engine loads its base from its node's
disk).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorafleet.engine.jobs import WorkKind

DONE, FAILED, TOKENS = "done", "failed", "tokens"


@dataclass(frozen=True, slots=True)
class WireJob:
    id: int  # unique per control plane: the key of the job in the handle's table
    kind: WorkKind
    payload: Any  # the engine/jobs.py payload; a Sample's lease is None here
    run_id: str | None = None
    seq_id: int | None = None
    tenant: str = ""
    key: Any = None  # a Sample's adapter key (its lease's key on the control side)
    weights: Any = None  # LoraWeights of `key` when shipped (the engine lacked them)


@dataclass(frozen=True, slots=True)
class Event:
    """One sink call of one job: DONE (data: the result), FAILED (data: an exception) or
    TOKENS (data: [(request, sample, token, logprob, top), ...] in order; top: the
    position's top-k logprobs or None)."""

    job: int
    what: str
    data: Any


@dataclass(slots=True)
class EngineState:
    """What an engine says about itself with every report."""

    incarnation: str  # changes when the actor restarts (pid and start time)
    pid: int
    node: str
    queue_depth: int  # sample jobs queued or decoding, training jobs queued
    slots: list[str] = field(default_factory=list)  # adapter keys in slots
    host: list[str] = field(default_factory=list)  # adapter keys in host memory
    runs: list[str] = field(default_factory=list)  # training runs loaded
    stats: dict[str, int] = field(default_factory=dict)  # scheduler and routing counters


@dataclass(slots=True)
class Report:
    events: list[Event]
    state: EngineState
