"""Mixed-adapter serving through the HTTP API (issue 5): does serving 32 distinct adapters cost
throughput over serving the base alone?

A real lorafleet server (uvicorn on loopback, in a thread) on HuggingFaceTB/SmolLM2-135M-Instruct
with 32 rank-8 adapters (all linear modules) in its catalog. Each round runs 32 concurrent
streaming /v1/completions requests (SSE), once with 32 distinct adapters and once all on the
base; rounds alternate (adapters, base, base, adapters, ...) and the figures are medians over
rounds. Adapters are warmed into slots first (POST /catalog/v1/warm), as a readiness-gated
deployment would. Prints ONE JSON line.

    python bench/serve_mixed.py            # 6 rounds, 32 tokens per stream
    python bench/serve_mixed.py --quick    # 2 rounds, 16 tokens

Keys: base_tok_s, adapters_tok_s (completion tokens per second over the round's wall time),
adapters_over_base (median over rounds of the paired ratio; target >= 0.85),
adapters_over_base_pooled (all tokens / all wall time), ttft_p50_ms_{base,adapters}.
The engine batches statically (one `engine.sample` per turn): how the 32 arrivals split
between the first and second turn varies per round, so single rounds are noisy; pair and pool.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402

from lorafleet.catalog.records import ADMIN, LOCAL_TENANT  # noqa: E402
from lorafleet.config import Paths  # noqa: E402
from lorafleet.lora.spec import LoraSpec  # noqa: E402
from lorafleet.lora.weights import LoraWeights  # noqa: E402

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SPEC = LoraSpec(rank=8, alpha=16.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"))
PROMPTS = ["Write a short poem about the sea.", "Explain what a LoRA adapter is.",
           "List three uses of a hammer.", "Tell me a story about a fox."]


def start(paths: Paths, state: Path, streams: int):
    import uvicorn

    from lorafleet.api.app import ServeConfig, create_app

    app = create_app(ServeConfig(bases=[SMOL], paths=paths, state_dir=state, max_slots=64,
                                 max_host_adapters=128, max_sample_queue=4 * streams))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return app, server, f"http://127.0.0.1:{port}"


async def one_round(url: str, models: list[str], max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        async def stream(i: int, model: str) -> tuple[int, float]:
            t0, first, tokens = time.perf_counter(), None, 0
            body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 1.0, "seed": i, "stream": True}
            async with client.stream("POST", f"{url}/v1/completions", json=body,
                                     headers={"X-API-Key": "tml-bench"}) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        if first is None:
                            first = time.perf_counter() - t0
                        if json.loads(line[6:])["choices"][0].get("text"):
                            tokens += 1
            return tokens, first or float("nan")

        t0 = time.perf_counter()
        res = await asyncio.gather(*(stream(i, m) for i, m in enumerate(models)))
        wall = time.perf_counter() - t0
    # tokens = SSE chunks carrying text (a held-back multi-byte or stop-prefix piece merges two)
    tokens = sum(t for t, _ in res)
    ttft = sorted(f for _, f in res)
    return {"tok_s": tokens / wall, "ttft_p50_ms": 1000 * ttft[len(ttft) // 2], "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 6)
    max_tokens = args.max_tokens or (16 if args.quick else 32)
    torch.set_num_threads(args.threads)
    home = Path(os.environ.get("LORAFLEET_HOME", Path(__file__).resolve().parents[1] / ".lorafleet-test"))
    with tempfile.TemporaryDirectory() as tmp:
        paths = Paths(home=home, database_url=f"sqlite:///{tmp}/catalog.db", store_url=f"{tmp}/store")
        app, server, url = start(paths, Path(tmp) / "tinker", args.streams)
        catalog = app.state.catalog
        info = app.state.openai.runners[SMOL].base.info
        catalog.create_tenant(LOCAL_TENANT)
        names = []
        for i in range(args.streams):
            w = LoraWeights.init(info, SPEC, seed=i)
            g = torch.Generator().manual_seed(i)
            w = LoraWeights(w.spec, {p: (a, torch.randn(b.shape, generator=g) * 0.01) for p, (a, b) in w.pairs.items()})
            catalog.create_policy(ADMIN, f"{LOCAL_TENANT}/m{i}", SMOL, SPEC)
            catalog.publish_weights(ADMIN, f"{LOCAL_TENANT}/m{i}", w)
            names.append(f"{LOCAL_TENANT}/m{i}")
        r = httpx.post(f"{url}/catalog/v1/warm", json={"refs": names, "tier": "slot"}, timeout=600)
        r.raise_for_status()
        loop = asyncio.new_event_loop()
        loop.run_until_complete(one_round(url, [SMOL] * 4 + names[:4], 4))  # warm-up
        runs: dict[str, list[dict]] = {"base": [], "adapters": []}
        for i in range(rounds):
            for kind in (("adapters", "base") if i % 2 == 0 else ("base", "adapters")):
                models = names if kind == "adapters" else [SMOL] * args.streams
                runs[kind].append(loop.run_until_complete(one_round(url, models, max_tokens)))
                print(kind, runs[kind][-1], file=sys.stderr)
        server.should_exit = True

    def med(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    out = {"bench": "serve_mixed", "base": SMOL, "streams": args.streams, "rank": SPEC.rank,
           "max_tokens": max_tokens, "rounds": rounds, "quick": args.quick}
    for kind, rs in runs.items():
        out[f"{kind}_tok_s"] = round(med([x["tok_s"] for x in rs]), 1)
        out[f"ttft_p50_ms_{kind}"] = round(med([x["ttft_p50_ms"] for x in rs]), 1)
    ratios = [a["tok_s"] / b["tok_s"] for a, b in zip(runs["adapters"], runs["base"])]
    out["adapters_over_base"] = round(med(ratios), 3)  # median over rounds of paired ratios
    out["adapters_over_base_pooled"] = round(  # all tokens over all wall time, per kind
        (sum(x["tokens"] for x in runs["adapters"]) / sum(x["tokens"] / x["tok_s"] for x in runs["adapters"]))
        / (sum(x["tokens"] for x in runs["base"]) / sum(x["tokens"] / x["tok_s"] for x in runs["base"])), 3)
    out["adapters_over_base_rounds"] = [round(r, 3) for r in ratios]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
