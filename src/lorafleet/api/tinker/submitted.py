"""The answer to a compute call of the Tinker API: the future's id (an UntypedAPIFuture)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Submitted:
    """The answer to a compute call: the future's id (plus sequence ids for samples)."""

    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"request_id": self.request_id}
        if self.model_id is not None:
            out["model_id"] = self.model_id
        if self.sample_sequence_ids is not None:
            out["sample_sequence_ids"] = self.sample_sequence_ids
        return out
