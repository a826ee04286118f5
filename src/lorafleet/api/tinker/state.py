"""Where the Tinker service's state lives: opening it over the catalog, and checking it (fsck).

The state is rows in the catalog's database (api/tinker/repo.py) and blobs in the catalog's
store; several API servers over one PostgreSQL and one store share it. A state folder of an
older lorafleet (`<state dir>/tinker.db` and `checkpoints/`, from before migration 0004) is
refused at start with what to do (docs/operations.md, "Upgrading the Tinker state"): its
training and sampler checkpoints are catalog revisions already and stay reachable by their
tinker:// paths, so moving the folder aside loses listings, exports and old futures only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.api.tinker.checkpoints import CheckpointReport, Checkpoints
from lorafleet.api.tinker.futures import FutureTable
from lorafleet.api.tinker.instance import Instance
from lorafleet.api.tinker.repo import TinkerRepo
from lorafleet.errors import InvalidRequest

log = logging.getLogger("lorafleet.tinker")
LEGACY_DB = "tinker.db"


@dataclass(frozen=True, slots=True)
class TinkerState:
    """The open Tinker state of one server process."""

    repo: TinkerRepo
    futures: FutureTable
    checkpoints: Checkpoints
    instance: Instance

    def close(self) -> None:
        self.instance.close()


def legacy_problem(state_dir: Path | None) -> str | None:
    """What to do about an older server's state folder in `state_dir`; None when there is none."""
    if state_dir is None or not (Path(state_dir) / LEGACY_DB).is_file():
        return None
    d = Path(state_dir)
    return (f"{d} holds Tinker state of a lorafleet older than catalog migration 0004 ({LEGACY_DB}, "
            "checkpoints/); sessions, runs, futures and checkpoints now live in the catalog database "
            "and store. Its training and sampler checkpoints are catalog revisions already and stay "
            "loadable by their tinker:// paths; its run listings, external exports and unfinished "
            f"futures are not carried over. Move it aside and start again: mv {d} {d}.pre-0004 "
            "(see docs/operations.md, 'Upgrading the Tinker state')")


def open_state(catalog: Any, state_dir: Path | None, hold_s: float = 30.0) -> TinkerState:
    """The Tinker state over an open `Catalog` (its database and store). Refuses an older
    server's state folder in `state_dir`; fails the futures of servers that are gone."""
    problem = legacy_problem(state_dir)
    if problem:
        raise InvalidRequest(problem)
    repo = TinkerRepo(catalog.db)
    instance = Instance(catalog.db)
    futures = FutureTable(repo, instance, hold_s=hold_s)
    lost = futures.recover()
    if lost:
        log.warning("%d futures of servers that stopped were lost; they now report an error", lost)
    return TinkerState(repo, futures, Checkpoints(repo, catalog.store), instance)


def check_state(catalog: Any, state_dir: Path | None) -> CheckpointReport:
    """fsck of the Tinker state: every checkpoint's blobs are whole, and no older server's
    state folder waits in `state_dir`."""
    report = Checkpoints(TinkerRepo(catalog.db), catalog.store).check()
    problem = legacy_problem(state_dir)
    return report if problem is None else CheckpointReport(report.checkpoints_checked,
                                                           (*report.problems, problem))
