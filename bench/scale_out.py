"""Scale-out on Ray (issue 16): does a second engine actor add throughput, do adapters stay where
they are resident, and how long does a killed engine take to stop mattering?

Real lorafleet servers (uvicorn on loopback, in this process) with their engines as Ray actors
of 1 torch thread each, first 1 then 2 actors per base, over one local Ray runtime that this
script holds for both (so the ratio compares engines, not Ray start-ups). Per variant:
- serving: the same mixed-adapter load over the OpenAI API (concurrent /v1/completions from a
  client process of their own, adapters drawn from a Zipf law over 16 catalog adapters), one
  untimed warm-up round, then timed rounds; completion tokens per second over wall time. Two
  loads: `long`, prompts of about `--prompt-tokens` tokens (a passage and a question, as a
  chat or RAG request carries), the load a second engine is for; and `short`, prompts of 7-9
  tokens, which one engine absorbs by batching (docs/BENCHMARKS.md says why);
- training: 2 concurrent Tinker training runs (real tinker SDK), `steps` forward_backward +
  optim_step each; wall time.
Then, on the 2-engine server: kill -9 the engine holding an adapter (its pid from
/admin/v1/engines) and time kill -> the first successful request for that adapter.

    python bench/scale_out.py                                   # SmolLM2
    python bench/scale_out.py --base lorafleet/tiny-llama       # the same load on tiny-llama
    python bench/scale_out.py --quick                           # tiny-llama, small rounds

Keys: serve_scale_2_over_1 (tokens/s, 2 engines over 1, long prompts; target >= 1.6),
serve_scale_short_2_over_1 (the same with short prompts), train_scale_2_over_1
(wall time of the 2 runs, 1 engine over 2; target >= 1.6), routing_hit_rate (share of the timed
2-engine sample jobs whose engine already had the adapter in memory; target >= 0.9),
failover_s, plus serve_tok_s_{1,2} (long), serve_short_tok_s_{1,2}, prompt_tokens (the long
load's mean, from the servers' usage), busiest_engine_share (the 2-engine long load's timed
jobs on its busiest engine; 0.5 is even), train_s_{1,2} and the base used. Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("TINKER_API_KEY", "tml-bench")

import httpx  # noqa: E402
import torch  # noqa: E402

from lorafleet.catalog.records import ADMIN, LOCAL_TENANT  # noqa: E402
from lorafleet.config import Paths  # noqa: E402
from lorafleet.lora.spec import LoraSpec  # noqa: E402
from lorafleet.lora.weights import LoraWeights  # noqa: E402

TINY = "lorafleet/tiny-llama"
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SPEC = LoraSpec(rank=8, alpha=16.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
PROMPTS = ["Write a short poem about the sea.", "Explain what a LoRA adapter is.",
           "List three uses of a hammer.", "Tell me a story about a fox."]
PASSAGE = ("The harbour town grew around a stone quay built for the fishing fleet. Every morning "
           "the boats left before dawn and came back by noon, and the market on the quay sold what "
           "they brought. Over the years the town added a school, a library and a small museum of "
           "maritime history, and visitors came in summer to walk along the cliffs. ")
QUESTIONS = ["What did the market sell?", "When did the boats come back?", "Why did visitors come?",
             "What did the town add over the years?"]
HEADERS = {"X-API-Key": "tml-bench"}
N_ADAPTERS = 16


def start(paths: Paths, state: Path, base: str, engines: int):
    import uvicorn

    from lorafleet.api.app import ServeConfig, create_app

    app = create_app(ServeConfig(bases=[base], paths=paths, state_dir=state, ray_engines=engines,
                                 engine_threads=1, max_sample_queue=256, hold_s=5.0))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # a bounded graceful shutdown: the Tinker SDK's heartbeats and long polls keep connections open,
    # and the engines (and their CPUs in Ray) are only freed once the lifespan has run
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return app, server, thread, f"http://127.0.0.1:{port}"


def publish(app, base: str) -> list[str]:
    catalog = app.state.catalog
    info = app.state.openai.runners[base].base.info
    catalog.create_tenant(LOCAL_TENANT)
    names = []
    for i in range(N_ADAPTERS):
        w = LoraWeights.init(info, SPEC, seed=i)
        g = torch.Generator().manual_seed(i)
        w = LoraWeights(w.spec, {p: (a, torch.randn(b.shape, generator=g) * 0.01) for p, (a, b) in w.pairs.items()})
        name = f"{LOCAL_TENANT}/m{i}"
        catalog.create_policy(ADMIN, name, base, SPEC)
        catalog.publish_weights(ADMIN, name, w)
        names.append(name)
    return names


def zipf(names: list[str], n: int, seed: int, s: float = 1.1) -> list[str]:
    weights = [1 / (k + 1) ** s for k in range(len(names))]
    return random.Random(seed).choices(names, weights=weights, k=n)


def prompts(load: str, prompt_tokens: int) -> list[str]:
    """The prompts of a load: `short` ones, or a passage of about `prompt_tokens` tokens (~90
    per repeat of PASSAGE) followed by a question, each request's passage starting elsewhere."""
    if load == "short":
        return PROMPTS
    repeats = max(1, round(prompt_tokens / 90))
    sentences = (PASSAGE * (repeats + 1)).split(". ")
    return [". ".join(sentences[i: i + 4 * repeats]) + ".\nQuestion: " + q + "\nAnswer:"
            for i, q in enumerate(QUESTIONS)]


def serve_round(url: str, models: list[str], texts: list[str], max_tokens: int,
                concurrency: int) -> tuple[int, int, float]:
    """(completion tokens, prompt tokens, wall seconds) of `models` requests, `concurrency` at a
    time. Runs in the client process (see `clients`)."""
    def one(i_model: tuple[int, str]) -> tuple[int, int]:
        i, model = i_model
        body = {"model": model, "prompt": texts[i % len(texts)], "max_tokens": max_tokens,
                "temperature": 1.0, "seed": i, "ignore_eos": True}
        for _ in range(50):
            r = http.post(f"{url}/v1/completions", json=body, headers=HEADERS, timeout=600)
            if r.status_code in (429, 503):
                time.sleep(float(r.headers.get("Retry-After", "1")))
                continue
            r.raise_for_status()
            usage = r.json()["usage"]
            return usage["completion_tokens"], usage["prompt_tokens"]
        raise RuntimeError("no answer after 50 tries")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(limits=limits) as http:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            counts = list(pool.map(one, enumerate(models)))
        wall = time.perf_counter() - t0
    return sum(c for c, _ in counts), sum(p for _, p in counts), wall


def clients() -> ProcessPoolExecutor:
    """The load generator's own process, so that it does not share the server's interpreter
    (and GIL) as no real client does; started once, reused by every round."""
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


def engines(url: str) -> list[dict]:
    return httpx.get(f"{url}/admin/v1/engines", headers=HEADERS, timeout=30).json()


def hits(url: str) -> tuple[list[int], list[int]]:
    """Per engine: sample jobs that found their adapter in memory, and those that did not."""
    listed = sorted(engines(url), key=lambda e: e["id"])
    return [e["sample_hits"] for e in listed], [e["sample_misses"] for e in listed]


def train(url: str, base: str, steps: int) -> float:
    """Wall seconds of 2 concurrent training runs of `steps` steps each."""
    import tinker
    from tinker import types

    def datum(tokens: list[int]) -> types.Datum:
        return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                           loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})

    batch = [datum([(7 * i + j) % 1000 + 1 for j in range(64)]) for i in range(8)]
    service = tinker.ServiceClient(base_url=url)
    clients = [service.create_lora_training_client(base_model=base, rank=8).result() for _ in range(2)]

    def run(tc, steps: int = steps) -> None:
        for _ in range(steps):
            fb = tc.forward_backward(batch, "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=1e-4)).result()
            fb.result()

    for tc in clients:  # untimed: one step each
        run(tc, 1)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(run, clients))
    return time.perf_counter() - t0


def failover(url: str, model: str, revision: str) -> float:
    """Kill -9 the engine holding `model` (its pid from /admin/v1/engines); seconds from the kill
    until a request for it succeeds again (on another engine, loaded from the store)."""
    body = {"model": model, "prompt": "Hi", "max_tokens": 1}
    httpx.post(f"{url}/v1/completions", json=body, headers=HEADERS, timeout=600).raise_for_status()
    victim = next(e for e in engines(url) if revision in e["resident"])
    os.kill(victim["pid"], signal.SIGKILL)
    t0 = time.perf_counter()
    while True:
        r = httpx.post(f"{url}/v1/completions", json=body, headers=HEADERS, timeout=600)
        if r.status_code == 200:
            return time.perf_counter() - t0
        time.sleep(0.01)


def variant(paths: Paths, tmp: Path, base: str, n: int, args, pool: ProcessPoolExecutor, do_train: bool,
            do_failover: bool) -> dict:
    app, server, thread, url = start(paths, tmp / f"state-{base.replace('/', '_')}-{n}", base, n)
    try:
        names = publish(app, base)
        out: dict = {}
        hit = miss = 0
        jobs: list[int] = []  # the long load's timed jobs per engine
        for load in ("long", "short"):
            texts = prompts(load, args.prompt_tokens)
            warm = zipf(names, args.requests, seed=0)  # untimed: cold loads, warm-up
            pool.submit(serve_round, url, warm, texts, args.max_tokens, args.concurrency).result()
            h0, m0 = hits(url)
            tokens = prompt = wall = 0.0
            for r in range(args.rounds):
                t, p, w = pool.submit(serve_round, url, zipf(names, args.requests, seed=r + 1), texts,
                                      args.max_tokens, args.concurrency).result()
                tokens, prompt, wall = tokens + t, prompt + p, wall + w
            h1, m1 = hits(url)
            hit, miss = hit + sum(h1) - sum(h0), miss + sum(m1) - sum(m0)
            if load == "long":
                jobs = [a + b - c - d for a, b, c, d in zip(h1, m1, h0, m0)]
            out[f"{load}_tok_s"] = tokens / wall
            out[f"{load}_prompt_tokens"] = prompt / (args.rounds * args.requests)
        out["hit_rate"] = hit / max(1, hit + miss)
        out["busiest_share"] = max(jobs) / max(1, sum(jobs))
        if do_train:
            out["train_s"] = train(url, base, args.steps)
        if do_failover:
            # the adapter of the first engine that holds one: its home dies
            model = names[0]
            out["failover_s"] = failover(url, model, app.state.catalog.resolve(model, ADMIN).id)
        return out
    finally:
        server.should_exit = True
        thread.join(timeout=300)
        if thread.is_alive():
            raise RuntimeError("the server did not stop; its engines would hold their CPUs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--requests", type=int, default=None, help="requests per round")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="the long load's prompt length, about (default 256, quick 128)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run")
    ap.add_argument("--base", default=None, help=f"default {SMOL} ({TINY} with --quick)")
    args = ap.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.requests = args.requests or (32 if args.quick else 64)
    args.max_tokens = args.max_tokens or (8 if args.quick else 16)
    args.steps = args.steps or (2 if args.quick else 4)
    args.prompt_tokens = args.prompt_tokens or (128 if args.quick else 256)
    torch.set_num_threads(1)
    from lorafleet.fleet.runtime import RUNTIME, RayOptions

    home = Path(os.environ.get("LORAFLEET_HOME", Path(__file__).resolve().parents[1] / ".lorafleet-test"))
    base = args.base or (TINY if args.quick else SMOL)
    RUNTIME.acquire(RayOptions(engines=2))  # one runtime for every variant
    try:
        with tempfile.TemporaryDirectory() as tmp, clients() as pool:
            def paths_for(tag: str) -> Paths:
                return Paths(home=home, database_url=f"sqlite:///{tmp}/{tag}.db", store_url=f"{tmp}/store-{tag}")

            one = variant(paths_for("a1"), Path(tmp), base, 1, args, pool, True, False)
            two = variant(paths_for("a2"), Path(tmp), base, 2, args, pool, True, True)
            result = {
                "bench": "scale_out", "quick": args.quick, "base": base,
                "serve_scale_2_over_1": round(two["long_tok_s"] / one["long_tok_s"], 3),
                "serve_scale_short_2_over_1": round(two["short_tok_s"] / one["short_tok_s"], 3),
                "train_scale_2_over_1": round(one["train_s"] / two["train_s"], 3),
                "routing_hit_rate": round(two["hit_rate"], 3),
                "failover_s": round(two["failover_s"], 3),
                "serve_tok_s_1": round(one["long_tok_s"], 1), "serve_tok_s_2": round(two["long_tok_s"], 1),
                "serve_short_tok_s_1": round(one["short_tok_s"], 1), "serve_short_tok_s_2": round(two["short_tok_s"], 1),
                "prompt_tokens": round(two["long_prompt_tokens"], 1),
                "busiest_engine_share": round(two["busiest_share"], 3),
                "train_s_1": round(one["train_s"], 2), "train_s_2": round(two["train_s"], 2),
            }
    finally:
        RUNTIME.release()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
