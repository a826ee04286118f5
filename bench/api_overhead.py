"""Tinker API overhead: the same forward_backward + optim_step through the tinker SDK over
loopback vs called on the engine directly (SmolLM2, batch 8 x 128). Prints ONE JSON line.

    python bench/api_overhead.py            # batch 8 x 128, 3 repeats
    python bench/api_overhead.py --quick    # batch 4 x 64

Keys: sdk_s and direct_s (median seconds per step), sdk_over_direct (target <= 1.10),
future_latency_p50_ms / _p90_ms (from the engine thread completing a future to the SDK
caller holding the result; target p50 <= 20). Server and client share this process (the
server in its own threads, like `lorafleet serve`), so both ends read the same clock.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import SMOL, emit, interleaved, median, note, parse_args, set_threads  # noqa: E402

os.environ.setdefault("TINKER_API_KEY", "tml-bench")
os.environ.setdefault("TINKER_TELEMETRY", "0")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    set_threads(args.threads)
    import tempfile

    import numpy as np
    import tinker
    import torch
    import uvicorn
    from tinker import types

    from lorafleet.api.app import ServeConfig, create_app
    from lorafleet.api.tinker.futures import PROTO_TYPE
    from lorafleet.config import Paths, paths_from_env
    from lorafleet.engine import Engine
    from lorafleet.model import load_base
    from lorafleet.train.types import AdamParams, Datum, FwdBwdRequest

    batch, seq = (4, 64) if args.quick else (8, 128)
    home = paths_from_env()
    tmp = Path(tempfile.mkdtemp(prefix="lorafleet-bench-"))
    paths = Paths(home.home, f"sqlite:///{tmp / 'catalog.db'}", str(tmp / "store"))
    note("loading SmolLM2")
    base = load_base(SMOL, paths)
    engine = Engine(base)
    app = create_app(ServeConfig(bases=[SMOL], paths=paths, state_dir=tmp,
                                 engines={SMOL: (base, engine)}))
    completed: list[float] = []
    futures = app.state.tinker.futures
    original = futures.complete

    def complete(request_id, payload, content_type):
        if content_type == PROTO_TYPE:  # stamp before the waiting client can be woken
            completed.append(time.time())
        original(request_id, payload, content_type)

    futures.complete = complete
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    client = tinker.ServiceClient(base_url=f"http://127.0.0.1:{port}")
    tc = client.create_lora_training_client(base_model=SMOL, rank=16).result()

    rng = np.random.default_rng(0)
    toks = rng.integers(100, 40000, size=(batch, seq + 1))
    sdk_batch = [types.Datum(model_input=types.ModelInput.from_ints(t[:-1].tolist()),
                             loss_fn_inputs={"target_tokens": t[1:].astype(np.int64),
                                             "weights": np.ones(seq, np.float32)}) for t in toks]
    adam = types.AdamParams(learning_rate=1e-4)
    handle = engine.create_adapter(app.state.tinker.runners[SMOL].runs[tc.model_id].spec, seed=0)
    direct_batch = [Datum(torch.from_numpy(t[:-1].copy()),
                          {"target_tokens": torch.from_numpy(t[1:].copy()),
                           "weights": torch.ones(seq)}) for t in toks]
    latencies: list[float] = []

    def via_sdk() -> None:
        fb = tc.forward_backward(sdk_batch, "cross_entropy")
        opt = tc.optim_step(adam)
        fb.result()
        latencies.append(time.time() - completed[-1])
        opt.result()

    def direct() -> None:
        engine.forward_backward([FwdBwdRequest(handle, direct_batch, "cross_entropy")])
        engine.optim_step(handle, AdamParams(learning_rate=1e-4))

    note(f"timing batch {batch} x {seq}, {args.repeats} repeats")
    times = interleaved({"sdk": via_sdk, "direct": direct}, repeats=args.repeats)
    server.should_exit = True
    lat = sorted(latencies[1:] or latencies)
    emit({
        "bench": "api_overhead", "base": SMOL, "batch": batch, "seq": seq,
        "threads": args.threads, "repeats": args.repeats,
        "sdk_s": median(times["sdk"]), "direct_s": median(times["direct"]),
        "sdk_over_direct": median(times["sdk"]) / median(times["direct"]),
        "future_latency_p50_ms": 1000 * statistics.median(lat),
        "future_latency_p90_ms": 1000 * lat[min(len(lat) - 1, math.ceil(0.9 * len(lat)) - 1)],
    })


if __name__ == "__main__":
    main()
