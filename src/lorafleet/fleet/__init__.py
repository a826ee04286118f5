"""Scale-out: the engines of each base as Ray actors behind one control plane (docs/scale-out.md).

- fleet/messages.py: what crosses the process boundary (jobs without sinks, sink events);
- fleet/worker.py: the engine actor (a Scheduler + Engine + residency in its own process);
- fleet/handle.py: the control plane's side of one actor (send, poll, fail on death);
- fleet/routing.py: placement of runs, adapter-affinity routing of samples (pure);
- fleet/fleet.py: the engines of one base behind the scheduler-shaped object the services use;
- fleet/runtime.py: the Ray runtime (local on loopback, or a cluster) and the actors.

Only fleet/runtime.py and fleet/handle.py import ray, and only when `--engines` is given.
"""

from __future__ import annotations

from typing import Any

from lorafleet.fleet.runtime import RayOptions
from lorafleet.fleet.worker import WorkerConfig


def build_fleet(base: Any, cfg: WorkerConfig, opts: RayOptions, metrics: Any, *,
                max_sample_queue: int = 512, spill_depth: int = 32) -> Any:
    """Start (or join) Ray, start `opts.engines` engine actors of `base`, wait until each has
    loaded its base, and return the `Fleet` the services use as the base's runner."""
    from lorafleet.fleet import runtime
    from lorafleet.fleet.fleet import Fleet
    from lorafleet.fleet.handle import EngineHandle

    runtime.RUNTIME.acquire(opts)
    actors = []
    try:
        actors = runtime.start_actors(cfg, opts)
        handles = [EngineHandle(f"{base.name}#{i}", base.name, a) for i, a in enumerate(actors)]
        for h in handles:
            h.wait_ready(runtime.READY_TIMEOUT_S)
    except BaseException:
        for a in actors:
            runtime.kill(a)
        runtime.RUNTIME.release()
        raise

    def stopped() -> None:
        for a in actors:
            runtime.kill(a)
        runtime.RUNTIME.release()

    return Fleet(base, handles, metrics, spill_depth=spill_depth, max_sample_queue=max_sample_queue,
                 max_slots=cfg.max_slots, on_stop=stopped)


__all__ = ["RayOptions", "WorkerConfig", "build_fleet"]
