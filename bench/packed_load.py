"""MoE adapter cold load, per-expert layout vs packed layout (MinT §3.5: 8.5-8.7x).

A rank-1 LoRA on q/k/v/o plus every routed expert's gate/up/down projections of a random
Qwen3-MoE base. Full: 128 experts x 48 layers, so the adapter has exactly the tensor counts
of MinT's Qwen3-30B-A3B case (37,248 per-expert, 672 packed); --quick: 64 experts x 8 layers
(3,136 / 112). Hidden 256, expert width 128: each per-expert tensor is <= 1 KiB (MinT: 37,152
of 37,248 are <= 4 KB). The base weights are random bf16 (~1.2 GB for the full variant).
The same adapter is written to a local content-addressed store twice: PEFT/vLLM per-expert
naming (`...experts.{e}.gate_proj.lora_A.weight`) and lorafleet's packed layout (one
[E, r, d] tensor per layer x projection x A/B). Each timed call is the engine-load slice:

    store.get (read + sha256 verify) -> parse_peft_files -> Engine.create_adapter (slot)

(then remove_adapter and gc.collect, untimed).

Both layouts are timed in the same process, interleaved, medians over repeats, fixed
torch threads. Prints one JSON line: tensor_count_per_expert, tensor_count_packed,
bytes_ratio (per-expert file / packed file), load_speedup (per-expert / packed median,
target >= 8.7), and the per-stage medians.

    .venv/bin/python bench/packed_load.py [--quick] [--threads 1] [--repeats N]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load as st_load

# so `python bench/packed_load.py` works from a source checkout without an editable install
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lorafleet.config import paths_from_env  # noqa: E402
from lorafleet.engine import Engine  # noqa: E402
from lorafleet.lora.io import WEIGHTS_NAME, parse_peft_files, peft_files  # noqa: E402
from lorafleet.lora.spec import LoraSpec  # noqa: E402
from lorafleet.lora.weights import LoraWeights  # noqa: E402
from lorafleet.model.registry import load_base_from_config  # noqa: E402
from lorafleet.store.blobs import LocalBlobStore  # noqa: E402

SPEC = LoraSpec(rank=1, alpha=2.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


def moe_config(experts: int, layers: int) -> dict:
    return dict(
        model_type="qwen3_moe", vocab_size=4096, hidden_size=256, intermediate_size=512,
        moe_intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, num_experts=experts, num_experts_per_tok=8,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )


def random_adapter(info, spec: LoraSpec, seed: int) -> LoraWeights:
    """PEFT's init for A plus a random B (the values do not matter to loading)."""
    w = LoraWeights.init(info, spec, seed)
    g = torch.Generator().manual_seed(seed + 10_000)
    return LoraWeights(spec, {p: (a, torch.randn(b.shape, generator=g) * 0.05) for p, (a, b) in w.pairs.items()})


def note(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 experts x 8 layers, under a minute")
    # the load slice is many small ops: extra intra-op threads only spin
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    # tiny per-expert tensors make single timings jumpy (allocator, GC): medians of many
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 9, quick 11)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    experts, layers = (64, 8) if args.quick else (128, 48)  # full: 37,248 tensors, as MinT's Qwen3-30B-A3B
    repeats = args.repeats or (11 if args.quick else 9)
    paths = paths_from_env()
    note(f"building a random Qwen3-MoE base: {experts} experts x {layers} layers")
    base = load_base_from_config(f"bench/moe-{experts}x{layers}", moe_config(experts, layers), paths, torch.bfloat16)
    engine = Engine(base)
    weights = random_adapter(base.info, SPEC, seed=0)
    store = LocalBlobStore(tempfile.mkdtemp(prefix="lorafleet-packed-load-"))
    refs, counts, sizes = {}, {}, {}
    for layout in ("per_expert", "packed"):
        files = peft_files(weights, base.name, layout=layout)
        refs[layout] = {name: store.put(data) for name, data in files.items()}
        counts[layout] = len(st_load(files[WEIGHTS_NAME]))
        sizes[layout] = len(files[WEIGHTS_NAME])
    stages: dict[str, dict[str, list[float]]] = {lay: {"read": [], "parse": [], "slot": [], "total": []} for lay in refs}

    def load(layout: str):
        def run() -> None:
            gc.collect()  # start every call from the same collector state (not timed)
            t0 = time.perf_counter()
            files = {name: store.get(ref) for name, ref in refs[layout].items()}
            t1 = time.perf_counter()
            adapter = parse_peft_files(files)
            t2 = time.perf_counter()
            handle = engine.create_adapter(adapter.spec, weights=adapter.weights)
            t3 = time.perf_counter()
            engine.remove_adapter(handle)
            for name, dt in (("read", t1 - t0), ("parse", t2 - t1), ("slot", t3 - t2), ("total", t3 - t0)):
                stages[layout][name].append(dt)
        return run

    # both layouts load the very same tensors
    a = parse_peft_files({n: store.get(r) for n, r in refs["per_expert"].items()}).weights.pairs
    b = parse_peft_files({n: store.get(r) for n, r in refs["packed"].items()}).weights.pairs
    assert a.keys() == b.keys() and all(torch.equal(a[p][i], b[p][i]) for p in a for i in (0, 1))

    note(f"timing {repeats} interleaved repeats of each layout")
    # one untimed warm-up each, then the layouts alternate (which goes first rotates), so load
    # from other processes hits both alike; gc.collect and remove_adapter stay out of the figures
    runs = {lay: load(lay) for lay in refs}
    for r in range(repeats + 1):
        for lay in (list(runs) if r % 2 else list(runs)[::-1]):
            runs[lay]()
    per, pk = (statistics.median(stages[lay]["total"][1:]) for lay in ("per_expert", "packed"))
    record = {
        "bench": "packed_load",
        "quick": args.quick,
        "threads": args.threads,
        "repeats": repeats,
        "experts": experts,
        "layers": layers,
        "rank": SPEC.rank,
        "tensor_count_per_expert": counts["per_expert"],
        "tensor_count_packed": counts["packed"],
        "bytes_per_expert_file": sizes["per_expert"],
        "bytes_packed_file": sizes["packed"],
        "bytes_ratio": sizes["per_expert"] / sizes["packed"],
        "load_s_per_expert": per,
        "load_s_packed": pk,
        "load_speedup": per / pk,
        "stages_s": {lay: {k: round(statistics.median(v[1:]), 4) for k, v in st.items() if k != "total"}
                     for lay, st in stages.items()},
    }
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}), flush=True)


if __name__ == "__main__":
    main()
