"""Crash consistency, the long run of tests/e2e/test_crash_consistency.py: SIGKILL a live
`lorafleet serve` at random points during save_state, save_weights_for_sampler, checkpoint
delete, evaluation record and alias move, restart it on the same home, check fsck, every
checkpoint, every held future; KILLS per catalog backend (SQLite, PostgreSQL). Prints ONE JSON
line: kills survived per backend, wall time, pass/fail.

    python bench/crash_kills.py             # 25 kills on each backend = 50
    python bench/crash_kills.py --kills 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=25, help="per backend")
    ap.add_argument("--quick", action="store_true", help="3 kills per backend (same keys)")
    args = ap.parse_args()
    if args.quick:
        args.kills = 3
    env = {**os.environ, "LORAFLEET_CRASH_KILLS": str(args.kills), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                           "tests/e2e/test_crash_consistency.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    survived = {b: int(n) for b, n in re.findall(r"(sqlite|postgresql): (\d+) kills survived", proc.stdout)}
    print(json.dumps({"kills_per_backend": args.kills, "survived": survived,
                      "total_survived": sum(survived.values()), "passed": proc.returncode == 0,
                      "wall_s": round(time.time() - t0, 1)}, sort_keys=True))
    if proc.returncode:
        sys.stderr.write(proc.stdout[-5000:])
        sys.exit(1)


if __name__ == "__main__":
    main()
