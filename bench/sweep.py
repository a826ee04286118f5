"""Scale-out sweep (issue 5, MinT §3): does catalog size change serving latency or throughput?

For N in {1,000, 10,000, 100,000} (`--quick`: {1,000, 10,000}) rank-1 adapters of
lorafleet/tiny-llama are bulk-registered in a fresh catalog + blob store, then a Zipf(1.1)
request stream over the N adapters runs through the real serving path in-process:
`OpenAIService.resolve` (catalog) -> `hold` (residency: host hit or a cold load queued on the
ColdLoader, 512-adapter host cache) -> the runner's fair ServingQueue -> one `engine.sample`
per turn with 64 slots. No HTTP (the HTTP layer is the same for every N). Prints ONE JSON line.

    python bench/sweep.py --quick      # N = 1k, 10k
    python bench/sweep.py              # N = 1k, 10k, 100k

Keys per N (suffix _N1000 etc.): throughput_rps, warm/cold p50/p95 latency (ms; a request is
cold when its adapter was in no tier at admission), loads, slot/host hit rates. Summary keys:
cold_p95_ratio_max_over_min_N (target <= 1.2), throughput_ratio_min_over_max_N (>= 0.83),
loads_per_identical_miss_burst (target 1: 16 concurrent requests for one cold adapter).

Fairness on a shared 2-core machine: one torch thread, the sizes are measured in alternating
rounds (1k, 10k, 100k, 100k, 10k, 1k, ...) and per-N figures are medians over rounds. The
adapters are distinct catalog revisions (distinct cache keys, real loads), but their bytes
come from `--distinct` weight files (default 256) shared round robin, so the store stays
small; every load still reads, verifies and parses its files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lorafleet.catalog import repo  # noqa: E402
from lorafleet.catalog.records import ADMIN  # noqa: E402
from lorafleet.catalog.refs import new_id  # noqa: E402
from lorafleet.config import Paths, paths_from_env  # noqa: E402
from lorafleet.engine.types import SamplingParams  # noqa: E402
from lorafleet.lora.spec import LoraSpec  # noqa: E402
from lorafleet.lora.weights import LoraWeights  # noqa: E402
from lorafleet.store.manifest import Manifest  # noqa: E402

TINY = "lorafleet/tiny-llama"
SPEC = LoraSpec(rank=1, alpha=32.0, target_modules=("q_proj", "v_proj"))
BATCH = 20_000


def populate(catalog, info, n: int, distinct: int) -> list[str]:
    """Bulk-register n policies `bench/aNNNNNN`, one revision each; returns their names."""
    from lorafleet.catalog.peft import weights_files

    manifests = []
    for seed in range(min(n, distinct)):
        w = LoraWeights.init(info, SPEC, seed=seed)
        g = torch.Generator().manual_seed(seed)
        w = LoraWeights(w.spec, {p: (a, torch.randn(b.shape, generator=g) * 0.1) for p, (a, b) in w.pairs.items()})
        files = weights_files(w, TINY)
        for data in files.values():
            catalog.store.put(data)
        manifests.append(Manifest.for_bytes(files))
    now = datetime.now(UTC)
    with catalog.db.write() as conn:
        repo.ensure_tenant(conn, "bench", now)
    names = []
    for start in range(0, n, BATCH):
        rows: dict[str, list[dict]] = {k: [] for k in ("policies", "revisions", "revision_files")}
        for i in range(start, min(n, start + BATCH)):
            pid, rid, m = new_id("pol"), new_id("rev"), manifests[i % len(manifests)]
            names.append(f"bench/a{i:06d}")
            rows["policies"].append(dict(
                id=pid, owner="bench", name=f"a{i:06d}", base_model=TINY, base_digest=None, lora_rank=1,
                lora_alpha=32.0, target_modules="q_proj,v_proj", use_rslora=False, parent_revision_id=None,
                public=False, created_at=now, deleted_at=None, tinker_run_id=None))
            rows["revisions"].append(dict(
                id=rid, policy_id=pid, seq=1, kind="sampler", sha256=m.digest, size_bytes=m.size_bytes,
                store_url=catalog.store.url, step=None, parent_revision_id=None, loss_fn=None, loss_config=None,
                optimizer_config=None, data_digest=None, code_version=None, created_by="bench",
                created_at=now, expires_at=None, tinker_path=None))
            rows["revision_files"] += [dict(revision_id=rid, filename=f, sha256=b.sha256, size_bytes=b.size_bytes)
                                       for f, b in m.files]
        with catalog.db.write() as conn:
            for table in ("policies", "revisions", "revision_files"):
                repo.bulk_insert(conn, table, rows[table])
    return names


def zipf_stream(n: int, count: int, rng: random.Random, s: float = 1.1) -> list[int]:
    weights = [1.0 / (r ** s) for r in range(1, n + 1)]
    ranks = rng.choices(range(n), weights=weights, k=count)
    perm = list(range(n))
    rng.shuffle(perm)  # popularity unrelated to insertion order
    return [perm[r] for r in ranks]


class Fleet:
    """One app (catalog + residency + runner) per catalog size, sharing the base and engine."""

    def __init__(self, n: int, pair, root: Path, home: Path, distinct: int, max_slots: int, max_host: int) -> None:
        from lorafleet.api.app import ServeConfig, create_app

        d = root / f"n{n}"
        d.mkdir()
        paths = Paths(home=home, database_url=f"sqlite:///{d / 'catalog.db'}", store_url=str(d / "store"))
        cfg = ServeConfig(bases=[TINY], paths=paths, state_dir=d / "tinker", engines={TINY: pair},
                          max_slots=max_slots, max_host_adapters=max_host, load_queue=256)
        self.app = create_app(cfg)
        self.svc = self.app.state.openai
        self.runner = self.svc.runners[TINY]
        self.residency = self.runner.residency
        t0 = time.perf_counter()
        self.names = populate(self.app.state.catalog, pair[0].info, n, distinct)
        self.populate_s = time.perf_counter() - t0
        self.runner.start()

    def close(self) -> None:
        self.runner.stop()
        self.residency.close()


async def run_stream(fleet: Fleet, refs: list[str], concurrency: int, max_tokens: int) -> dict:
    svc = fleet.svc
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=())
    prompt = [1, 450, 7483, 310, 3444, 338]
    warm, cold = [], []
    sem = asyncio.Semaphore(concurrency)
    m = svc.metrics
    before = {t: (m.tier_hits.labels(t)._value.get(), m.tier_misses.labels(t)._value.get()) for t in ("slot", "host")}
    loads0 = fleet.residency.loader.loads

    async def one(ref: str) -> None:
        async with sem:
            t0 = time.perf_counter()
            target = svc.resolve(ref, ADMIN)
            is_cold = str(fleet.residency.tier(target.revision_id)) == "store"
            await svc.sample(target, [prompt], params, 1)
            (cold if is_cold else warm).append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(r) for r in refs))
    wall = time.perf_counter() - t0
    rates = {}
    for t, (h0, m0) in before.items():
        h, mi = m.tier_hits.labels(t)._value.get() - h0, m.tier_misses.labels(t)._value.get() - m0
        rates[f"{t}_hit_rate"] = h / max(1.0, h + mi)
    return dict(throughput_rps=len(refs) / wall, warm=warm, cold=cold,
                loads=fleet.residency.loader.loads - loads0, **rates)


async def burst(fleet: Fleet, ref: str, k: int = 16) -> int:
    loads0 = fleet.residency.loader.loads
    params = SamplingParams(max_tokens=2, temperature=0.0)
    target = fleet.svc.resolve(ref, ADMIN)
    await asyncio.gather(*(fleet.svc.sample(target, [[1, 2, 3]], params, 1) for _ in range(k)))
    return fleet.residency.loader.loads - loads0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return 1000 * xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def med(xs: list[float]) -> float:
    xs = sorted(x for x in xs if x == x)
    return xs[len(xs) // 2] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="*")
    ap.add_argument("--requests", type=int, default=800, help="requests per size per round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (median over rounds)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--distinct", type=int, default=256)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--host", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", type=Path, default=None, help="PNG of latency vs catalog size")
    ap.add_argument("--replot", type=Path, default=None, help="only redraw --plot from a saved JSON line")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads(args.replot.read_text())
        plot(saved, saved["sizes"], args.plot)
        return
    torch.set_num_threads(args.threads)
    sizes = args.sizes or ([1_000, 10_000] if args.quick else [1_000, 10_000, 100_000])

    from lorafleet.engine import Engine
    from lorafleet.model import load_base

    home = Path(os.environ.get("LORAFLEET_HOME", Path(__file__).resolve().parents[1] / ".lorafleet-test"))
    base = load_base(TINY, paths_from_env({"LORAFLEET_HOME": str(home)}))
    pair = (base, Engine(base))
    rng = random.Random(0)
    out: dict[str, object] = {"bench": "sweep", "base": TINY, "sizes": sizes, "slots": args.slots,
                              "host_cache": args.host, "requests_per_round": args.requests,
                              "rounds": args.rounds, "concurrency": args.concurrency, "quick": args.quick}
    with tempfile.TemporaryDirectory() as tmp:
        fleets = {n: Fleet(n, pair, Path(tmp), home, args.distinct, args.slots, args.host) for n in sizes}
        for n, f in fleets.items():
            out[f"populate_s_N{n}"] = round(f.populate_s, 2)
        loop = asyncio.new_event_loop()
        per: dict[int, list[dict]] = {n: [] for n in sizes}
        order = []
        for r in range(args.rounds):
            order += sizes if r % 2 == 0 else sizes[::-1]
        # warm-up: engine kernels, catalog caches
        for n, f in fleets.items():
            loop.run_until_complete(run_stream(f, [f.names[i] for i in zipf_stream(n, 64, rng)], args.concurrency, args.max_tokens))
        for n in order:
            f = fleets[n]
            refs = [f.names[i] for i in zipf_stream(n, args.requests, rng)]
            per[n].append(loop.run_until_complete(run_stream(f, refs, args.concurrency, args.max_tokens)))
            print(f"N={n}: {per[n][-1]['throughput_rps']:.1f} req/s, cold {len(per[n][-1]['cold'])}", file=sys.stderr)
        cold_p95, thr = {}, {}
        for n, runs in per.items():
            thr[n] = med([x["throughput_rps"] for x in runs])
            cold_p95[n] = med([pct(x["cold"], 0.95) for x in runs])
            out.update({
                f"throughput_rps_N{n}": round(thr[n], 1),
                f"warm_p50_ms_N{n}": round(med([pct(x["warm"], 0.5) for x in runs]), 1),
                f"warm_p95_ms_N{n}": round(med([pct(x["warm"], 0.95) for x in runs]), 1),
                f"cold_p50_ms_N{n}": round(med([pct(x["cold"], 0.5) for x in runs]), 1),
                f"cold_p95_ms_N{n}": round(cold_p95[n], 1),
                f"cold_requests_N{n}": int(med([len(x["cold"]) for x in runs])),
                f"loads_N{n}": int(med([x["loads"] for x in runs])),
                f"slot_hit_rate_N{n}": round(med([x["slot_hit_rate"] for x in runs]), 3),
                f"host_hit_rate_N{n}": round(med([x["host_hit_rate"] for x in runs]), 3),
            })
        out["cold_p95_ratio_max_over_min_N"] = round(max(cold_p95.values()) / min(cold_p95.values()), 3)
        out["throughput_ratio_min_over_max_N"] = round(min(thr.values()) / max(thr.values()), 3)
        big = fleets[sizes[-1]]
        cold_ref = next(nm for nm in reversed(big.names)
                        if str(big.residency.tier(big.svc.resolve(nm, ADMIN).revision_id)) == "store")
        out["loads_per_identical_miss_burst"] = loop.run_until_complete(burst(big, cold_ref))
        for f in fleets.values():
            f.close()
    print(json.dumps(out))
    if args.plot:
        plot(out, sizes, args.plot)


def plot(out: dict, sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("warm_p50", "o-"), ("warm_p95", "o--"), ("cold_p50", "s-"), ("cold_p95", "s--")):
        ax.plot(sizes, [out[f"{key}_ms_N{n}"] for n in sizes], style, label=key.replace("_", " "))
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("adapters in the catalog (N)")
    ax.set_ylabel("request latency (ms)")
    ax.set_title("tiny-llama, 64 slots, 512 host adapters, Zipf(1.1)")
    ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
