"""Where work goes among the live engines of one base (MinT's locality-aware routing).

- A training run goes to the least-loaded engine (fewest runs, then shortest queue) and stays
  there: its optimizer state lives in that engine, and its fused batches form there.
- A sampling request goes to an engine where its adapter is resident (the least loaded of
  them); otherwise to the engine that rendezvous hashing of the adapter key picks among the
  live engines (so the same adapter keeps landing on the same engine, and when an engine
  leaves only its adapters move). An engine is passed over, for the least loaded one, when it is
  overloaded: its queue is over `spill_depth`, or longer than the least loaded engine's by more
  than `spill_slack` (a Zipf-hot adapter would otherwise pin a share of the traffic to its home
  however busy that is; a spilled request's adapter loads there, and from then on both engines
  hold it). Base-only requests go to the least loaded engine.

Pure functions over `Candidate` records: no Ray, no threads; fleet/fleet.py feeds them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

RESIDENT, HASHED, SPILLED, LEAST_LOADED = "resident", "hashed", "spilled", "least_loaded"
SPILL_SLACK = 4  # jobs more than the least loaded engine's: docs/scale-out.md


@dataclass(frozen=True, slots=True)
class Candidate:
    id: str  # the engine id, stable across restarts (rendezvous weight input)
    load: int  # jobs sent and not answered yet
    runs: int = 0
    resident: bool = False  # the adapter asked for is in its slots or host memory


def rendezvous(key: Hashable, ids: Sequence[str]) -> str:
    """The id with the highest hash of (key, id): highest random weight hashing."""
    def weight(engine_id: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{engine_id}".encode(), digest_size=8).digest()

    return max(ids, key=weight)


def least_loaded(cands: Sequence[Candidate]) -> Candidate:
    return min(cands, key=lambda c: (c.load, c.runs, c.id))


def place_run(cands: Sequence[Candidate]) -> Candidate:
    return min(cands, key=lambda c: (c.runs, c.load, c.id))


def route_sample(key: Hashable | None, cands: Sequence[Candidate], spill_depth: int,
                 spill_slack: int = SPILL_SLACK) -> tuple[Candidate, str]:
    """(engine, why) for a sample job on adapter `key` (None: the base alone)."""
    spill = least_loaded(cands)
    if key is None:
        return spill, LEAST_LOADED

    def overloaded(c: Candidate) -> bool:
        return c.load > spill_depth or c.load - spill.load > spill_slack

    resident = [c for c in cands if c.resident and not overloaded(c)]
    if resident:
        return least_loaded(resident), RESIDENT
    chosen = rendezvous(key, [c.id for c in cands])
    home = next(c for c in cands if c.id == chosen)
    if overloaded(home) and spill.load < home.load:
        return spill, SPILLED
    return home, HASHED
