"""Ray for `lorafleet serve --engines N`: start a local runtime (or join a cluster) and create
the engine actors.

A local runtime is private to this server and closed to the network: no dashboard, a bounded
object store, its own temp dir, every port on 127.0.0.1 (Ray 2.60 binds a local instance to the
machine's address unless `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` and `_node_ip_address` say
otherwise; tests/engine/test_ray_fleet.py checks the listening sockets), and Ray's token
authentication on (its default in 2.60). `--ray-address ADDR` joins an existing cluster
instead (docs/scale-out.md); the engines then spread over its nodes.

Ray is imported here only: without `--engines`, nothing imports it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from lorafleet.fleet.worker import EngineWorker, WorkerConfig

log = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 256 << 20  # results and adapters in flight; spills to disk beyond it
MAX_RESTARTS = 16  # Ray restarts a dead engine actor this many times
READY_TIMEOUT_S = 600.0
START_ATTEMPTS = 3  # a loaded machine can miss Ray's fixed start-up wait  # an engine loads its base in this time, or start-up fails


@dataclass(frozen=True, slots=True)
class RayOptions:
    engines: int  # engine actors per base
    threads: int = 1  # torch threads of each
    address: str | None = None  # join this cluster; None: a local runtime of our own
    object_store_bytes: int = OBJECT_STORE_BYTES
    max_restarts: int = MAX_RESTARTS


class _Runtime:
    """The process's Ray connection, shared by the fleets of every base (refcounted)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._owned = False
        self._temp: str | None = None

    def acquire(self, opts: RayOptions) -> None:
        import ray

        with self._lock:
            self._users += 1
            if ray.is_initialized():
                return
            if opts.address:
                ray.init(address=opts.address, namespace="lorafleet", log_to_driver=True,
                         configure_logging=False)
                log.info("joined the Ray cluster at %s", opts.address)
                return
            _loopback_only()
            self._temp = tempfile.mkdtemp(prefix="lorafleet-ray-")  # short: Ray's socket paths
            for attempt in range(1, START_ATTEMPTS + 1):
                try:
                    ray.init(num_cpus=max(2, opts.engines * opts.threads), include_dashboard=False,
                             object_store_memory=opts.object_store_bytes, _temp_dir=self._temp,
                             _node_ip_address="127.0.0.1", namespace="lorafleet", log_to_driver=True,
                             configure_logging=False)
                    break
                except Exception as e:  # Ray gives its raylet a fixed 30 s to register
                    ray.shutdown()
                    if attempt == START_ATTEMPTS:
                        self._users -= 1
                        shutil.rmtree(self._temp, ignore_errors=True)
                        self._temp = None
                        raise
                    log.warning("the local Ray runtime did not start (%s); trying again", e)
            self._owned = True
            log.info("started a local Ray runtime (loopback only, temp dir %s)", self._temp)

    def release(self) -> None:
        import ray

        with self._lock:
            self._users -= 1
            if self._users > 0 or not self._owned:
                return
            ray.shutdown()
            self._owned = False
            if self._temp:
                shutil.rmtree(self._temp, ignore_errors=True)
                self._temp = None

    @property
    def temp_dir(self) -> str | None:
        return self._temp


RUNTIME = _Runtime()


def _loopback_only() -> None:
    """Keep a local node (and the workers it spawns, which inherit the environment) on 127.0.0.1.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported, so a process that imported
    ray before (a test, a notebook) also gets the flag set on the constant it became.
    """
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def start_actors(cfg: WorkerConfig, opts: RayOptions) -> list[Any]:
    """N engine actors of one base (named '<base>#i'), each loading its base in its process."""
    import ray

    # polls run in their own group: a poll waiting for events never holds up a submit
    remote = ray.remote(concurrency_groups={"poll": 1})(EngineWorker)
    actors = []
    for _ in range(opts.engines):
        actors.append(remote.options(
            num_cpus=opts.threads, max_restarts=opts.max_restarts, max_task_retries=0,
            scheduling_strategy="SPREAD",
        ).remote(cfg))
    return actors


def kill(actor: Any) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already gone
        pass
