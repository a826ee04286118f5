"""Routing policy of the Ray fleet (lorafleet/fleet/routing.py): pure functions, no Ray."""

from __future__ import annotations

from collections import Counter

from lorafleet.fleet.routing import (
    HASHED, LEAST_LOADED, RESIDENT, SPILLED, Candidate, place_run, rendezvous, route_sample,
)

IDS = ["b#0", "b#1", "b#2"]


def cands(loads=(0, 0, 0), runs=(0, 0, 0), resident=(False, False, False)) -> list[Candidate]:
    return [Candidate(i, load, r, res) for i, load, r, res in zip(IDS, loads, runs, resident)]


def test_rendezvous_is_stable_spreads_and_moves_only_the_leavers_keys():
    keys = [f"rev-{i}" for i in range(600)]
    home = {k: rendezvous(k, IDS) for k in keys}
    assert home == {k: rendezvous(k, list(reversed(IDS))) for k in keys}  # order does not matter
    counts = Counter(home.values())
    assert set(counts) == set(IDS) and min(counts.values()) > 120  # roughly even
    without = {k: rendezvous(k, IDS[:2]) for k in keys}
    assert all(without[k] == home[k] for k in keys if home[k] != "b#2")  # only b#2's keys move


def test_resident_engine_wins_then_hash_then_spill():
    key = "rev-7"
    hashed = rendezvous(key, IDS)
    other = next(i for i in IDS if i != hashed)
    res = tuple(i == other for i in IDS)
    c, why = route_sample(key, cands(resident=res), spill_depth=4)
    assert (c.id, why) == (other, RESIDENT)
    c, why = route_sample(key, cands(), spill_depth=4)
    assert (c.id, why) == (hashed, HASHED)
    loads = tuple(9 if i == hashed else (1 if i == other else 5) for i in IDS)
    c, why = route_sample(key, cands(loads=loads), spill_depth=4)
    assert (c.id, why) == (other, SPILLED)
    # an overloaded resident engine is passed over too
    c, _ = route_sample(key, cands(loads=tuple(9 if i == other else 0 for i in IDS), resident=res), 4)
    assert c.id != other


def test_a_home_far_busier_than_the_least_loaded_engine_spills_below_the_depth():
    key = "rev-7"
    hashed = rendezvous(key, IDS)
    other = next(i for i in IDS if i != hashed)
    res = tuple(i == hashed for i in IDS)
    within = tuple(5 if i == hashed else 1 for i in IDS)  # 4 more: still at home
    assert route_sample(key, cands(loads=within, resident=res), spill_depth=32, spill_slack=4)[0].id == hashed
    assert route_sample(key, cands(loads=within), spill_depth=32, spill_slack=4) == (
        next(c for c in cands(loads=within) if c.id == hashed), HASHED)
    beyond = tuple(6 if i == hashed else (1 if i == other else 3) for i in IDS)  # 5 more than `other`
    c, why = route_sample(key, cands(loads=beyond, resident=res), spill_depth=32, spill_slack=4)
    assert (c.id, why) == (other, SPILLED)
    c, why = route_sample(key, cands(loads=beyond), spill_depth=32, spill_slack=4)
    assert (c.id, why) == (other, SPILLED)


def test_base_requests_and_runs_go_to_the_least_loaded():
    c, why = route_sample(None, cands(loads=(3, 1, 2)), spill_depth=4)
    assert (c.id, why) == ("b#1", LEAST_LOADED)
    assert place_run(cands(loads=(0, 5, 0), runs=(2, 0, 1))).id == "b#1"  # fewest runs first


def test_the_in_process_server_never_imports_ray():
    import subprocess
    import sys

    code = ("import sys, lorafleet.api.app, lorafleet.cli.serve, lorafleet.fleet, lorafleet.fleet.fleet; "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
