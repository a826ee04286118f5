"""Population voting on SmolLM2: does a majority of K briefly trained variants beat repeated
sampling of the best one, and how much faster is one k-adapter vote than k requests?
Prints ONE JSON line.

    python bench/population.py                 # K=27 variants, 5 SFT steps each
    python bench/population.py --quick         # K=9, a few steps and problems
    python bench/population.py --plot docs/img/population_accuracy.png

K LoRA variants of SmolLM2-135M-Instruct are trained by SFT on lorafleet's engine (in process;
the K variants' forward_backward fused into one batch per step, as the server does for
concurrent Tinker runs), each from its own LoRA seed and its own subset and order of the
training problems, and published into a catalog as `local/pop-<i>`; then the same engine
serves them from a real server on loopback. Task: `a+b=` (a < 20, b < 10), exact answers;
train, dev and test problems are disjoint.

Accuracy on held-out test problems, at k = 1, 3, 9, 27 (those <= K):
- `vote_acc_k*`: majority of k variants, each answering greedily once (population voting;
  POST /v1/population/completions with all K variants per problem, majorities of k-subsets
  computed from the members' answers with the server's own tally, averaged over random subsets);
- `best_acc_k*`: majority of k samples (temperature 0.7) of the single best variant, chosen on a
  separate dev split (repeated sampling, /v1/completions with n);
- `best_greedy_acc`, `mean_variant_acc`, `base_greedy_acc` for reference.
Wall time, interleaved repeats, medians: one 9-variant vote vs 9 sequential /v1/completions
requests (one per variant, greedy, the same prompt): `vote_wall_speedup_k9` (target >= 4).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]
from bench._common import ATTN, SMOL, emit, interleaved, median, note, set_threads  # noqa: E402

KS = (1, 3, 9, 27)
TEMPERATURE = 0.7
MAX_TOKENS = 3
ANSWER = {"regex": r"-?\d+"}


def problems(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` distinct problems `a+b=` (a < 20, b < 10), shuffled: splits never share a problem."""
    pairs = [(a, b) for a in range(20) for b in range(10)]
    random.Random(seed).shuffle(pairs)
    return [(f"{a}+{b}=", str(a + b)) for a, b in pairs[:n]]


def datum(tok, prompt: str, answer: str):
    import torch

    from lorafleet.train.types import Datum

    p = tok.encode(prompt, add_special_tokens=False)
    a = tok.encode(answer + "\n", add_special_tokens=False)
    tokens = p + a
    weights = [0.0] * (len(p) - 1) + [1.0] * len(a)
    return Datum(torch.tensor(tokens[:-1]), {"target_tokens": torch.tensor(tokens[1:]),
                                             "weights": torch.tensor(weights, dtype=torch.float32)})


def train_variants(engine, catalog, k: int, steps: int, batch: int, train: list[tuple[str, str]],
                   lr: float) -> list[str]:
    """K SFT runs on lorafleet's engine, their forward_backward fused into one batch per step;
    each variant published into the catalog as `local/pop-<i>`. Returns the policy names."""
    from lorafleet.catalog.records import ADMIN
    from lorafleet.lora.spec import LoraSpec
    from lorafleet.model.registry import base_digest
    from lorafleet.train.types import AdamParams, FwdBwdRequest

    spec = LoraSpec(rank=8, alpha=16.0, target_modules=ATTN)
    tok = engine.base.tokenizer
    handles = [engine.create_adapter(spec, seed=1000 + i) for i in range(k)]
    orders = []
    for i in range(k):  # each variant: its own half of the problems, in its own order
        subset = random.Random(i).sample(train, len(train) // 2)
        orders.append([datum(tok, p, a) for p, a in subset])
    for step in range(steps):
        reqs = []
        for h, data in zip(handles, orders):
            lo = (step * batch) % len(data)
            reqs.append(FwdBwdRequest(h, (data + data)[lo: lo + batch]))
        results = engine.forward_backward(reqs)
        for h in handles:
            engine.optim_step(h, AdamParams(learning_rate=lr))
        if step % 4 == 0 or step == steps - 1:
            losses = [r.metrics["loss:sum"] / batch for r in results]
            note(f"step {step + 1}/{steps}: mean loss per example {sum(losses) / k:.3f}")
    names = []
    for i, h in enumerate(handles):
        name = f"local/pop-{i}"
        catalog.create_policy(ADMIN, name, SMOL, spec, base_digest=base_digest(SMOL))
        catalog.publish_weights(ADMIN, name, engine.get_weights(h))
        engine.remove_adapter(h)
        names.append(name)
    return names


def majority(answers: list[str | None]) -> str | None:
    from lorafleet.api.openai.voting import tally

    return tally(answers).answer


def subset_accuracy(per_problem: list[list[str | None]], truths: list[str], k: int, draws: int,
                    seed: int, ordered: bool = False) -> float:
    """Mean accuracy of the majority of k members, over `draws` random k-subsets per problem
    (`ordered`: the first k, e.g. a sample sequence)."""
    rng = random.Random(seed)
    hits, total = 0, 0
    for answers, truth in zip(per_problem, truths):
        for _ in range(1 if ordered else draws):
            pick = answers[:k] if ordered else rng.sample(answers, k)
            hits += majority(pick) == truth
            total += 1
    return hits / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="K=9, few steps and problems")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", type=int, default=None, help="K >= 9 (default 27, quick 9)")
    ap.add_argument("--steps", type=int, default=None, help="SFT steps per variant (default 5, quick 3)")
    ap.add_argument("--plot", type=Path, default=None, help="write accuracy vs k here (PNG)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, quick 2)")
    ap.add_argument("--batch", type=int, default=4, help="SFT examples per variant per step")
    ap.add_argument("--test", type=int, default=None, help="test problems (default 16, quick 6)")
    ap.add_argument("--dev", type=int, default=None, help="dev problems, to pick the best variant (default 6, quick 4)")
    ap.add_argument("--lr", type=float, default=8e-3, help="SFT learning rate")
    args = ap.parse_args()
    q = args.quick
    K = args.variants or (9 if q else 27)
    if K < 9:
        ap.error("--variants must be at least 9 (the timed vote has 9 members)")
    steps = args.steps or (3 if q else 5)
    repeats = args.repeats or (2 if q else 3)
    n_train = 64 if q else 160
    n_dev, n_test = args.dev or (4 if q else 6), args.test or (6 if q else 16)
    set_threads(args.threads)

    import socket
    import threading

    import httpx
    import uvicorn

    from lorafleet.api.app import ServeConfig, create_app
    from lorafleet.catalog.service import Catalog
    from lorafleet.config import Paths, paths_from_env
    from lorafleet.engine import Engine
    from lorafleet.model import load_base

    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="bench-population-"))
    home = paths_from_env()
    paths = Paths(home=home.home, database_url=f"sqlite:///{tmp / 'catalog.db'}", store_url=str(tmp / "store"))
    base = load_base(SMOL, paths)
    engine = Engine(base)
    data = problems(n_train + n_dev + n_test, seed=0)
    train, dev, test = data[:n_train], data[n_train:n_train + n_dev], data[n_train + n_dev:]
    note(f"training {K} variants x {steps} steps (batch {args.batch}), fused")
    t0 = time.time()
    catalog = Catalog.open(paths.database_url, paths.store_url)
    names = train_variants(engine, catalog, K, steps, args.batch, train, lr=args.lr)
    catalog.close()
    train_s = time.time() - t0

    # the same engine serves them: a real server on loopback
    app = create_app(ServeConfig(bases=[SMOL], paths=paths, state_dir=tmp / "tinker", threads=args.threads,
                                 engines={SMOL: (base, engine)}))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600, headers={"X-API-Key": "tml-bench"})

    def vote(prompt: str, members: list[str]) -> dict:
        r = http.post("/v1/population/completions", json={
            "adapters": members, "prompt": prompt, "max_tokens": MAX_TOKENS, "stop": ["\n"], "extract": ANSWER})
        r.raise_for_status()
        return r.json()

    def one(model: str, prompt: str, n: int = 1, temperature: float = 0.0, seed: int | None = None) -> list[str | None]:
        from lorafleet.api.openai.voting import compile_extractor

        ex = compile_extractor(ANSWER["regex"])
        r = http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "n": n,
                                               "temperature": temperature, "seed": seed, "stop": ["\n"]})
        r.raise_for_status()
        return [ex(c["text"]) for c in r.json()["choices"]]

    note("population answers (dev + test), every variant per problem in one vote")
    t0 = time.time()
    dev_answers = [[c["answer"] for c in vote(p, names)["choices"]] for p, _ in dev]
    test_votes = [vote(p, names) for p, _ in test]
    vote_eval_s = time.time() - t0
    test_answers = [[c["answer"] for c in v["choices"]] for v in test_votes]
    truths = [a for _, a in test]
    full_k_agrees = sum(v["answer"] == majority(a) for v, a in zip(test_votes, test_answers)) == len(test)
    dev_acc = [sum(a[i] == t for a, (_, t) in zip(dev_answers, dev)) / len(dev) for i in range(K)]
    test_acc = [sum(a[i] == t for a, t in zip(test_answers, truths)) / len(test) for i in range(K)]
    best = max(range(K), key=lambda i: (dev_acc[i], -i))
    base_acc = sum(one(SMOL, p)[0] == t for p, t in test) / len(test)

    ks = [k for k in KS if k <= K]  # larger k: the key is there, its value null
    note(f"repeated sampling of the best variant ({names[best]}), {max(ks)} samples per problem")
    samples = []
    for j, (p, _) in enumerate(test):
        got: list[str | None] = []
        while len(got) < max(ks):
            n = min(16, max(ks) - len(got))
            got += one(names[best], p, n=n, temperature=TEMPERATURE, seed=10_000 * j + len(got))
        samples.append(got)

    out: dict = {"variants": K, "sft_steps": steps, "test_problems": len(test), "dev_problems": len(dev),
                 "temperature_repeated": TEMPERATURE}
    for k in KS:
        out[f"vote_acc_k{k}"] = subset_accuracy(test_answers, truths, k, draws=1 if k == K else 20,
                                                seed=k) if k <= K else None
        out[f"best_acc_k{k}"] = subset_accuracy(samples, truths, k, draws=1, seed=k, ordered=True) if k <= K else None
    out.update(best_variant=names[best], best_greedy_acc=test_acc[best], mean_variant_acc=sum(test_acc) / K,
               max_variant_acc=max(test_acc), min_variant_acc=min(test_acc), base_greedy_acc=base_acc,
               endpoint_majority_matches_tally=full_k_agrees)

    members = names[:9]
    prompt = test[0][0]
    note(f"timing: one 9-variant vote vs 9 sequential requests, {repeats} repeats")
    times = interleaved({"vote": lambda: vote(prompt, members),
                         "sequential": lambda: [one(m, prompt) for m in members]}, repeats=repeats)
    out["vote_wall_s_k9"] = median(times["vote"])
    out["sequential_wall_s_k9"] = median(times["sequential"])
    out["vote_wall_speedup_k9"] = median(times["sequential"]) / median(times["vote"])
    out.update(train_s=train_s, vote_eval_s=vote_eval_s, total_s=time.time() - t_start)
    if args.plot is not None:
        plot(args.plot, ks, [out[f"vote_acc_k{k}"] for k in ks], [out[f"best_acc_k{k}"] for k in ks], out)
        out["plot"] = str(args.plot)
    emit(out)
    http.close()
    server.should_exit = True


def plot(path: Path, ks: list[int], vote: list[float], best: list[float], out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.plot(ks, vote, "o-", label="majority of k variants (greedy each)")
    ax.plot(ks, best, "s--", label=f"best variant, k samples (T={TEMPERATURE})")
    ax.axhline(out["base_greedy_acc"], color="grey", lw=0.8, ls=":", label="base, greedy")
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (votes)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"SmolLM2-135M, {out['variants']} SFT variants, a+b (a<20, b<10)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()
