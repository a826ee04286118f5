"""Shared helpers for the benchmarks: arguments, threads, interleaved timing, one JSON line.

Every benchmark measures its baselines in the same process and the same run, interleaving
the variants repeat by repeat so that noise from other processes on the machine hits all of
them alike; figures are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# so `python bench/x.py` works from a source checkout without an editable install
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lorafleet.lora.spec import LoraSpec  # noqa: E402
from lorafleet.lora.weights import LoraWeights  # noqa: E402
from lorafleet.model.registry import BaseInfo  # noqa: E402

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def parse_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="smaller variant, under a minute")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3, quick 2)")
    ap.add_argument("--profile", default=None, help="write a torch.profiler table to this file")
    args = ap.parse_args()
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    return args


def set_threads(n: int) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(n)


def random_adapter(
    info: BaseInfo, spec: LoraSpec, seed: int, b_scale: float = 0.05
) -> LoraWeights:
    """PEFT's init for A plus a random B, so the adapter really changes the outputs."""
    w = LoraWeights.init(info, spec, seed)
    g = torch.Generator().manual_seed(seed + 10_000)
    pairs = {p: (a, torch.randn(b.shape, generator=g) * b_scale) for p, (a, b) in w.pairs.items()}
    return LoraWeights(spec, pairs)


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run every fn `warmup` times untimed, then `repeats` rounds of all fns; seconds per call.

    The order within a round rotates, so no variant always runs right after the same other.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def emit(record: dict) -> None:
    """The benchmark's one JSON line on stdout (floats rounded for reading)."""
    def rnd(v):
        if isinstance(v, float):
            return round(v, 4)
        if isinstance(v, dict):
            return {k: rnd(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rnd(x) for x in v]
        return v

    print(json.dumps(rnd(record)), flush=True)


def note(msg: str) -> None:
    """Progress on stderr, so stdout stays one JSON line."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def serve(paths, state: Path, **cfg):
    """A real lorafleet server on loopback (uvicorn in a thread): (app, server, url)."""
    import socket
    import threading

    import uvicorn

    from lorafleet.api.app import ServeConfig, create_app

    app = create_app(ServeConfig(bases=[SMOL], paths=paths, state_dir=state, **cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _server_threads[id(server)] = thread
    while not server.started:
        time.sleep(0.05)
    return app, server, f"http://127.0.0.1:{port}"


_server_threads: dict = {}


def stop(server, timeout: float = 120.0) -> None:
    """Shut a `serve` server down and wait for its lifespan to stop the engines: a process that
    exits while an engine lane is still inside a torch kernel aborts ("terminate called")."""
    server.should_exit = True
    _server_threads.pop(id(server)).join(timeout)


def percentile(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; nan for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def stream_completion(client, url: str, body: dict, t_sent: float) -> dict:
    """One streaming /v1/completions call: TTFT, inter-token gaps, tokens (SSE text chunks)."""
    import json as _json

    first, last, gaps, tokens = None, None, [], 0
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                             headers={"X-API-Key": "tml-bench"}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if not _json.loads(line[6:])["choices"][0].get("text"):
                continue
            now = time.perf_counter()
            if first is None:
                first = now - t_sent
            else:
                gaps.append(now - last)
            last, tokens = now, tokens + 1
    return {"ttft": first if first is not None else float("nan"), "gaps": gaps, "tokens": tokens,
            "end": last or time.perf_counter()}
