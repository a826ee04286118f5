"""Records of queued engine work: an `Op` per request, a `LiveModel` per resident run."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from lorafleet.lora.spec import LoraSpec

FWDBWD = "forward_backward"
BARRIERS = frozenset({"optim_step", "save_weights", "save_weights_for_sampler",
                      "save_weights_external", "load_weights"})


@dataclass(slots=True, eq=False)
class Op:
    """One unit of queued work; `payload` is already validated wire data."""

    request_id: str
    kind: str
    tenant: str
    payload: Any
    model_id: str | None = None
    seq_id: int | None = None
    submitted: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class LiveModel:
    """A training run resident in this engine."""

    model_id: str
    tenant: str
    handle: int
    spec: LoraSpec
    lora_flags: dict[str, Any]
    step: int = 0
    next_seq: int = 1
    ops: dict[int, Op] = field(default_factory=dict)
    gap_since: float | None = None
    poisoned: str | None = None
    batches: Any = field(default_factory=hashlib.sha256)  # digest of data since last save
    last_loss: dict[str, Any] | None = None
    last_adam: dict[str, float] | None = None
    parent: str | None = None
