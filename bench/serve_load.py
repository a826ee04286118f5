"""Continuous batching under open-loop load (issue 11): TTFT, ITL and throughput of the
iteration-level scheduler against admission only at batch boundaries, in the same run.

A real lorafleet server (uvicorn on loopback, in a thread) on HuggingFaceTB/SmolLM2-135M-Instruct
with 32 rank-8 adapters in its catalog, warmed into slots. Requests arrive as a Poisson
process over the OpenAI API (streaming /v1/completions), each on an adapter drawn from a Zipf
law (p ~ 1/rank), with a prompt of 32-256 random token ids and max_tokens 16-256 (quick:
prompts 32-64, outputs 16-32, 8 requests per rate). The same seeded workload runs at three request rates, 0.3, 0.7
and 1.0 of the saturation rate (estimated first from a closed-loop burst), once with
continuous batching and once with admission only when the running batch is empty
(`Budgets.boundary_only`, the knob of the same scheduler). Prints ONE JSON line.

    OMP_NUM_THREADS=1 python bench/serve_load.py --quick
    OMP_NUM_THREADS=1 python bench/serve_load.py

Keys per rate r in (r30, r70, r100) and mode m in (cont, boundary): `{m}_{r}_ttft_p50_ms`,
`_ttft_p99_ms`, `_itl_p50_ms`, `_itl_p99_ms`, `_tok_s` (output tokens / wall time from the
first arrival to the last token). `throughput_over_boundary_only` = cont / boundary tok/s at
saturation (target >= 1.5); `ttft_p99_ratio_at_70pct` = cont TTFT p99 at 70% load over the
TTFT of a lone request measured in the same run (target <= 3).

With a vLLM environment (`make vllm-venv`, or LORAFLEET_VLLM_PYTHON; docs/vllm.md), the `vllm`
column: the same workload, closed burst and at 0.7 of lorafleet's saturation rate, on a second
lorafleet server with `--sampler vllm` (same catalog, 32 adapters warmed into vLLM), and the same
burst sent straight to that vLLM server (its own OpenAI API, adapters by their vLLM names).
Keys `vllm_burst_tok_s`, `vllm_r70_*`, `vllm_direct_burst_tok_s`, `engine_over_vllm_tok_s`
(lorafleet's engine / --sampler vllm, burst; aim >= 0.8 on CPU) and
`vllm_control_plane_cost` (direct vLLM tok/s over --sampler vllm tok/s, minus 1; aim <= 0.10).
Without a vLLM environment: "vllm": "skipped: <why>".
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

import httpx  # noqa: E402
import torch  # noqa: E402

from lorafleet.catalog.records import ADMIN, LOCAL_TENANT  # noqa: E402
from lorafleet.config import Paths  # noqa: E402
from lorafleet.lora.spec import LoraSpec  # noqa: E402

SPEC = LoraSpec(rank=8, alpha=16.0, target_modules=c.ATTN + ("gate_proj", "up_proj", "down_proj"))
N_ADAPTERS = 32


def workload(n: int, vocab: int, quick: bool, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(N_ADAPTERS)]
    hi_p, hi_o = (64, 32) if quick else (256, 256)
    out = []
    for i in range(n):
        a = rng.choices(range(N_ADAPTERS), weights)[0]
        prompt = [rng.randrange(100, vocab) for _ in range(rng.randint(32, hi_p))]
        out.append({"model": f"{LOCAL_TENANT}/m{a}", "prompt": prompt, "max_tokens": rng.randint(16, hi_o),
                    "temperature": 1.0, "seed": i})
    return out


async def run_load(url: str, reqs: list[dict], rate: float | None, seed: int = 1) -> dict:
    """Send `reqs` as a Poisson process of `rate` per second (None: all at once)."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=1800) as client:
        t0 = time.perf_counter()
        at, tasks = 0.0, []
        for body in reqs:
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(c.stream_completion(client, url, body, time.perf_counter())))
            if rate:
                at += rng.expovariate(rate)
        res = await asyncio.gather(*tasks)
    wall = max(r["end"] for r in res) - t0
    tokens = sum(r["tokens"] for r in res)
    ttft = [r["ttft"] for r in res]
    gaps = [g for r in res for g in r["gaps"]]
    return {"ttft_p50_ms": 1000 * c.percentile(ttft, 0.5), "ttft_p99_ms": 1000 * c.percentile(ttft, 0.99),
            "itl_p50_ms": 1000 * c.percentile(gaps, 0.5), "itl_p99_ms": 1000 * c.percentile(gaps, 0.99),
            "tok_s": tokens / wall, "tokens": tokens, "wall_s": wall}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=None, help="requests per rate (default 48, quick 8)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    n = args.requests or (8 if args.quick else 48)
    c.set_threads(args.threads)
    home = Path(os.environ.get("LORAFLEET_HOME", Path(__file__).resolve().parents[1] / ".lorafleet-test"))
    with tempfile.TemporaryDirectory() as tmp:
        paths = Paths(home=home, database_url=f"sqlite:///{tmp}/catalog.db", store_url=f"{tmp}/store")
        app, server, url = c.serve(paths, Path(tmp) / "tinker", max_slots=64, max_host_adapters=128,
                                   max_sample_queue=1024)
        catalog = app.state.catalog
        runner = app.state.openai.runners[c.SMOL]
        info = runner.base.info
        catalog.create_tenant(LOCAL_TENANT)
        names = []
        for i in range(N_ADAPTERS):
            catalog.create_policy(ADMIN, f"{LOCAL_TENANT}/m{i}", c.SMOL, SPEC)
            catalog.publish_weights(ADMIN, f"{LOCAL_TENANT}/m{i}", c.random_adapter(info, SPEC, seed=i, b_scale=0.01))
            names.append(f"{LOCAL_TENANT}/m{i}")
        httpx.post(f"{url}/catalog/v1/warm", json={"refs": names, "tier": "slot"}, timeout=600).raise_for_status()
        loop = asyncio.new_event_loop()
        reqs = workload(n, info.vocab_size, args.quick)
        lone = loop.run_until_complete(run_load(url, reqs[:1], None))  # warm-up, then the unloaded TTFT
        lone = loop.run_until_complete(run_load(url, reqs[:1], None))
        burst = loop.run_until_complete(run_load(url, reqs, None))  # closed burst: the saturation rate
        mean_out = burst["tokens"] / len(reqs)
        saturation = burst["tok_s"] / mean_out  # requests per second the engine sustains
        print("lone", lone, "burst", burst, file=sys.stderr)
        out = {"bench": "serve_load", "base": c.SMOL, "adapters": N_ADAPTERS, "requests_per_rate": n,
               "quick": args.quick, "saturation_req_s": round(saturation, 3),
               "lone_ttft_ms": round(lone["ttft_p50_ms"], 1)}
        for frac in (0.3, 0.7, 1.0):
            tag = f"r{int(frac * 100)}"
            for mode in (("cont", "boundary") if frac != 0.7 else ("boundary", "cont")):
                runner.decode.budgets.boundary_only = mode == "boundary"
                res = loop.run_until_complete(run_load(url, reqs, saturation * frac))
                print(tag, mode, res, file=sys.stderr)
                for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tok_s"):
                    out[f"{mode}_{tag}_{k}"] = round(res[k], 1)
        runner.decode.budgets.boundary_only = False
        c.stop(server)
        out["cont_burst_tok_s"] = round(burst["tok_s"], 1)
        out |= vllm_column(loop, paths, Path(tmp), names, reqs, saturation, burst["tok_s"])
    out["throughput_over_boundary_only"] = round(out["cont_r100_tok_s"] / out["boundary_r100_tok_s"], 3)
    out["ttft_p99_ratio_at_70pct"] = round(out["cont_r70_ttft_p99_ms"] / out["lone_ttft_ms"], 3)
    out["torch_threads"] = torch.get_num_threads()
    c.emit(out)


async def direct_completion(client, url: str, body: dict, t_sent: float) -> dict:
    """One streaming completion straight to vLLM: tokens counted from `return_token_ids` (vLLM
    may put several tokens in one chunk)."""
    import json as _json

    first, last, gaps, tokens = None, None, [], 0
    async with client.stream("POST", f"{url}/v1/completions",
                             json={**body, "stream": True, "return_token_ids": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            n = len(_json.loads(line[6:])["choices"][0].get("token_ids") or [])
            if not n:
                continue
            now = time.perf_counter()
            if first is None:
                first = now - t_sent
            else:
                gaps.append(now - last)
            last, tokens = now, tokens + n
    return {"ttft": first if first is not None else float("nan"), "gaps": gaps, "tokens": tokens,
            "end": last or time.perf_counter()}


def vllm_column(loop, paths, tmp: Path, names: list[str], reqs: list[dict], saturation: float,
                engine_burst: float) -> dict:
    from lorafleet.engine.vllm import VllmSettings
    from lorafleet.engine.vllm.process import default_python

    python = os.environ.get("LORAFLEET_VLLM_PYTHON") or default_python()
    if python is None:
        return {"vllm": "skipped: no vLLM environment (make vllm-venv, or LORAFLEET_VLLM_PYTHON)"}
    print("starting lorafleet --sampler vllm", file=sys.stderr)
    settings = VllmSettings(python=Path(python), max_loras=N_ADAPTERS, max_lora_rank=8, threads=1)
    app, server, url = c.serve(paths, tmp / "tinker-vllm", max_slots=N_ADAPTERS + 4, max_host_adapters=128,
                               max_sample_queue=1024, sampler="vllm", vllm=settings)
    httpx.post(f"{url}/catalog/v1/warm", json={"refs": names, "tier": "slot"}, timeout=600).raise_for_status()
    runner = app.state.openai.runners[c.SMOL]
    loop.run_until_complete(run_load(url, reqs[:2], None))  # warm-up
    out: dict = {}
    burst = loop.run_until_complete(run_load(url, reqs, None))
    r70 = loop.run_until_complete(run_load(url, reqs, saturation * 0.7))
    # the same burst straight to vLLM: each catalog name -> the vLLM name of its revision
    catalog = app.state.catalog
    lora = {n: runner.residency.lora_name(catalog.resolve(n, ADMIN).id) for n in names}
    vurl = runner.sampler.process.url

    async def direct() -> dict:
        async with httpx.AsyncClient(timeout=1800) as client:
            t0 = time.perf_counter()
            res = await asyncio.gather(*[direct_completion(client, vurl, {**b, "model": lora[b["model"]],
                                                                          "ignore_eos": False}, t0) for b in reqs])
        wall = max(r["end"] for r in res) - t0
        return {"tok_s": sum(r["tokens"] for r in res) / wall}

    loop.run_until_complete(direct())  # warm-up
    vdirect = loop.run_until_complete(direct())
    print("vllm burst", burst, "r70", r70, "direct", vdirect, file=sys.stderr)
    out["vllm_burst_tok_s"] = round(burst["tok_s"], 1)
    for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tok_s"):
        out[f"vllm_r70_{k}"] = round(r70[k], 1)
    out["vllm_direct_burst_tok_s"] = round(vdirect["tok_s"], 1)
    out["engine_over_vllm_tok_s"] = round(engine_burst / burst["tok_s"], 3)
    out["vllm_over_engine_tok_s"] = round(burst["tok_s"] / engine_burst, 3)
    out["vllm_control_plane_cost"] = round(vdirect["tok_s"] / burst["tok_s"] - 1, 3)
    c.stop(server)
    return out


if __name__ == "__main__":
    main()
