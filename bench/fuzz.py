"""OpenAPI fuzzing, the long run of tests/e2e/test_fuzz_openapi.py: every operation of the
server's own schema, N schemathesis examples each, against a live server (tiny-llama) with
`--auth none` and then `--auth keys`. Prints ONE JSON line: operations, examples run, status
counts, and `server_errors` / `dropped` (both must be 0; the run fails otherwise).

    python bench/fuzz.py                    # 100 examples per operation, seed 1
    python bench/fuzz.py --examples 20 --seed 7

Needs the dev extras (schemathesis). Runs from a source checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=100, help="examples per operation")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=1800.0, help="per auth mode")
    ap.add_argument("--quick", action="store_true", help="10 examples per operation, 60 s per mode")
    args = ap.parse_args()
    if args.quick:
        args.examples, args.budget_s = 10, 60.0

    from lorafleet.config import paths_from_env
    from lorafleet.engine import Engine
    from lorafleet.model import load_base
    from tests.e2e.conftest import TINY, start_server
    from tests.e2e.test_fuzz_openapi import _alive, fuzz

    paths = paths_from_env()
    base = load_base(TINY, paths)
    pair = (base, Engine(base))
    out: dict = {"examples_per_operation": args.examples, "seed": args.seed}
    t0 = time.time()
    for auth in ("none", "keys"):
        with tempfile.TemporaryDirectory() as tmp:
            live = start_server(paths, [TINY], Path(tmp), engines={TINY: pair}, auth=auth,
                                hold_s=0.5, gap_timeout_s=2.0)
            try:
                headers = {"X-API-Key": live.app.state.catalog.create_key("fuzzer")} if auth == "keys" else {}
                stats = fuzz(live.url, live.app.openapi(), headers, args.examples, args.budget_s, args.seed)
                _alive(live.url, headers)
            finally:
                live.stop()
        out[f"auth_{auth}"] = stats
    out.update(server_errors=0, dropped=0, wall_s=round(time.time() - t0, 1))
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
