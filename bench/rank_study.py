"""How small can the adapter be? GRPO on the recipe's task at LoRA ranks x seeds (long; not in CI).

    python bench/rank_study.py                    # SmolLM2, ranks 1,4,16 x seeds 0,1,2, 10 steps, group 6 x 2
    python bench/rank_study.py --quick            # tiny-llama, 2 steps (plumbing only)

All rank x seed runs train concurrently on one `lorafleet serve` subprocess (the recipe's own
`train`); each is its own training run. Sampling is batched across them; forward_backward runs
one policy at a time (`serial_fwdbwd`): fusing all 9 made the server's fp32 logits
(9 x 16 x ~50 tokens x 49,152 vocab) and their gradients reach 15.5 GB RSS and get OOM-killed. Policies with the same seed see the same problems.
Prints ONE JSON line (reward curves, first/last-3-steps mean per run, per-rank summary) and
writes the plot to --plot (default docs/img/rank_study.png).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import SMOL, emit, note  # noqa: E402
from bench.multi_policy import TINY, Server, free_port  # noqa: E402


def plot(path: Path, curves: dict[tuple[int, int], list[float]], ranks: list[int], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = dict(zip(ranks, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
    for (rank, seed), c in curves.items():
        ax.plot(range(len(c)), c, color=colors[rank], alpha=0.3, lw=1)
    for rank in ranks:
        runs = [c for (r, _), c in curves.items() if r == rank]
        mean = [statistics.fmean(x) for x in zip(*runs)]
        ax.plot(range(len(mean)), mean, color=colors[rank], lw=2.5, label=f"rank {rank} (mean of {len(runs)} seeds)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward (max 1.0)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ranks", default="1,4,16")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--group-size", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--task", default="add")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", type=Path, default=ROOT / "docs/img/rank_study.png")
    args = ap.parse_args()
    os.environ.setdefault("TINKER_API_KEY", "tml-local")
    from recipes import grpo

    ranks = [int(x) for x in args.ranks.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    if args.quick:
        args.steps, args.group_size, args.batch_size = 2, 2, 1
    base = TINY if args.quick else SMOL
    cfg = grpo.Config(base_model=base, steps=args.steps, group_size=args.group_size,
                      batch_size=args.batch_size, max_tokens=8, learning_rate=args.learning_rate,
                      quiet=False, name_prefix="rank", task=args.task, serial_fwdbwd=True)
    runs = [(r, s) for s in seeds for r in ranks]
    policies = [grpo.Policy(i, args.task, rank=r, seed=s, rng=random.Random(s * 1000))
                for i, (r, s) in enumerate(runs)]
    server = Server(base, args.threads, Path(tempfile.mkdtemp(prefix="lorafleet-rank-study-")), free_port())
    cfg.base_url = server.url
    note(f"{len(runs)} runs ({ranks} x seeds {seeds}) x {args.steps} steps on {base}")
    t0 = time.perf_counter()
    try:
        asyncio.run(grpo.train(cfg, policies))
    finally:
        server.stop()
    wall = time.perf_counter() - t0
    curves = {(r, s): p.rewards for (r, s), p in zip(runs, policies)}
    first = {k: statistics.fmean(c[:3]) for k, c in curves.items()}
    last = {k: statistics.fmean(c[-3:]) for k, c in curves.items()}
    summary = {}
    for rank in ranks:
        gains = [last[(rank, s)] - first[(rank, s)] for s in seeds]
        summary[f"r{rank}"] = {
            "last3_mean": statistics.fmean(last[(rank, s)] for s in seeds),
            "last3_min": min(last[(rank, s)] for s in seeds),
            "gain_mean": statistics.fmean(gains), "gain_min": min(gains),
        }
    plot(args.plot, curves, ranks, f"GRPO '{args.task}' on {base.split('/')[-1]}: ranks x {len(seeds)} seeds")
    emit({"bench": "rank_study", "base": base, "task": args.task, "steps": args.steps,
          "group_size": args.group_size, "batch_size": args.batch_size, "lr": args.learning_rate,
          "wall_s": wall, "summary": summary,
          "curves": {f"r{r}_s{s}": c for (r, s), c in curves.items()}})


if __name__ == "__main__":
    main()
