"""The sampler seam: where a scheduler's SAMPLE jobs run.

The default is lorafleet's own engine: `Scheduler` (engine/scheduler.py) decodes SAMPLE jobs on
its decode lane with continuous batching (engine/decode.py). A `Sampler` runs them
elsewhere instead; `RoutedScheduler` is a Scheduler whose SAMPLE jobs go to one, while training
(forward_backward, optim_step, saves) stays on the engine. The only other sampler today is vLLM
(engine/vllm/, `lorafleet serve --sampler vllm`). Services (api/tinker, api/openai) see no
difference: they submit the same typed jobs and read results from their sinks.
"""

from __future__ import annotations

from typing import Any, Protocol

from lorafleet.engine.jobs import Job, WorkKind
from lorafleet.engine.scheduler import Scheduler
from lorafleet.errors import NoCapacity

SAMPLERS = ("engine", "vllm")


class Sampler(Protocol):
    """Runs SAMPLE jobs; reports each exactly once through the scheduler's `_report`."""

    def start(self) -> None: ...

    def submit(self, job: Job) -> None:
        """Queue a job (NoCapacity when full or draining)."""

    def drain(self, reason: str) -> None:
        """Refuse new jobs; running ones end with an error."""

    def stop(self) -> None: ...

    def health(self) -> dict[str, Any]: ...


class RoutedScheduler(Scheduler):
    """A Scheduler whose SAMPLE jobs run on `sampler` (set before `start`)."""

    sampler: Sampler

    def submit(self, job: Job) -> None:
        if job.kind is not WorkKind.SAMPLE:
            return super().submit(job)
        if self._closed is not None:
            raise NoCapacity(self._closed)
        self.sampler.submit(job)

    def start(self) -> None:
        self.sampler.start()
        super().start()

    def drain(self, reason: str = "the server is shutting down") -> None:
        super().drain(reason)
        self.sampler.drain(reason)

    def stop(self) -> None:
        super().stop()
        self.sampler.stop()

    def health(self, stall_s: float) -> dict[str, Any]:
        h = super().health(stall_s)
        s = self.sampler.health()
        return {**h, "ok": h["ok"] and s["ok"], "sampler": s}

    @property
    def stats(self) -> dict[str, int]:
        return {**super().stats, **getattr(self.sampler, "stats", {})}


__all__ = ["SAMPLERS", "RoutedScheduler", "Sampler"]
