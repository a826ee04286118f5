"""Per-step metrics of Tinker training runs, as the server computed them, for the console.

Every `forward_backward` result carries scalar metrics (`loss:sum` and whatever the loss
function reports); the SDK hands them to the client and forgets them. `RunMetrics` keeps them
in the Tinker state, one row per (run, step, metric), so /admin/v1/runs/{id} can draw a run's
loss curve live (api/routes/console.py). A training call (`kind` "train") is recorded under the
optimizer step its gradients go into (the run's step count when it finished); a forward-only
call is recorded as "eval" (rows in `tinker_run_metrics`, api/tinker/repo.py). Rewards are computed by the client, never sent: the server only
shows what it sees.

Flow: `TinkerService._enqueue` calls `watch(job)` before the job reaches the engine, and the
`FutureTable` calls `done(request_id, payload)` when the future completes (payload None when
it failed), so no completion can race its registration.
"""

from __future__ import annotations

import logging
import threading

from lorafleet.api.tinker.repo import TinkerRepo, now
from lorafleet.engine.jobs import Job, WorkKind

log = logging.getLogger(__name__)

MAX_POINTS = 10_000  # the most rows one series query returns (the newest)


class RunMetrics:
    def __init__(self, repo: TinkerRepo) -> None:
        self.repo = repo
        self._watched: dict[str, tuple[str, str]] = {}  # request_id -> (model_id, kind)
        self._lock = threading.Lock()

    def watch(self, request_id: str, job: Job) -> None:
        """Remember a forward_backward job so its result's metrics are recorded."""
        if job.kind is WorkKind.FORWARD_BACKWARD and job.run_id is not None:
            kind = "eval" if getattr(job.payload, "forward_only", False) else "train"
            with self._lock:
                self._watched[request_id] = (job.run_id, kind)

    def done(self, request_id: str, payload: bytes | None) -> None:
        """A future finished (payload None: it failed); record a watched one's metrics."""
        with self._lock:
            watched = self._watched.pop(request_id, None)
        if watched is None or payload is None:
            return
        model_id, kind = watched
        try:
            from tinker.proto import tinker_public_pb2 as pb

            msg = pb.ForwardBackwardOutput()
            msg.ParseFromString(payload)
            run = self.repo.run_by_id(model_id)
            step = run["step"] if run else 0
            at = now()
            self.repo.insert_metrics([{"model_id": model_id, "step": step, "kind": kind, "name": name,
                                       "value": float(value), "at": at} for name, value in msg.metrics.items()])
        except Exception:  # a console chart must never fail a training call
            log.exception("could not record the metrics of %s", request_id)

    def series(self, model_id: str) -> dict[str, list[list[float]]]:
        """`{"train/loss:sum": [[step, value], ...], ...}`, oldest first."""
        rows = self.repo.metrics(model_id, MAX_POINTS)
        out: dict[str, list[list[float]]] = {}
        for r in rows:
            out.setdefault(f"{r['kind']}/{r['name']}", []).append([r["step"], r["value"]])
        return out

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._watched.pop(request_id, None)

