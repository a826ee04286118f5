"""CPU weight prepacking (engine/prepack.py): mixed-adapter sampling on SmolLM2 with and
without oneDNN-packed base weights. Prints ONE JSON line.

    python bench/cpu_prepack.py            # rows 1, 4, 9, 32; 16 new tokens; 512-token prefill
    python bench/cpu_prepack.py --quick    # fewer tokens and repeats, same keys

Two engines over two copies of the base, one plain and one prepacked, sample the same requests
(each row its own rank-8 adapter, greedy), interleaved repeat by repeat; medians.
Keys: `speedup_rows{N}` = plain / prepacked wall time of one `Engine.sample` of N rows,
`prefill_speedup_512` the same for one 512-token prompt and one new token, `extra_mib` the
memory the packed copies take.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import ATTN, SMOL, emit, interleaved, median, parse_args, random_adapter, set_threads  # noqa: E402

ROWS = (1, 4, 9, 32)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    set_threads(args.threads)
    from lorafleet.config import paths_from_env
    from lorafleet.engine import Engine, SampleRequest, SamplingParams
    from lorafleet.engine.prepack import packed_bytes
    from lorafleet.lora.spec import LoraSpec
    from lorafleet.model import load_base

    paths = paths_from_env()
    engines = {"plain": Engine(load_base(SMOL, paths), cpu_prepack=False),
               "prepacked": Engine(load_base(SMOL, paths), cpu_prepack=True)}
    extra = packed_bytes(engines["prepacked"].base.model)
    spec = LoraSpec(rank=8, alpha=16.0, target_modules=ATTN)
    handles = {name: [e.create_adapter(spec, weights=random_adapter(e.info, spec, seed=i)) for i in range(max(ROWS))]
               for name, e in engines.items()}
    new_tokens = 4 if args.quick else 16
    prompt = engines["plain"].base.tokenizer.encode("The capital of France is", add_special_tokens=False)
    long_prompt = (prompt * 200)[:512]

    def job(name: str, rows: int):
        reqs = [SampleRequest(h, prompt, 1, SamplingParams(max_tokens=new_tokens, temperature=0, stop_token_ids=()))
                for h in handles[name][:rows]]
        return lambda: engines[name].sample(reqs)

    def prefill(name: str):
        req = SampleRequest(handles[name][0], long_prompt, 1, SamplingParams(max_tokens=1, temperature=0))
        return lambda: engines[name].sample([req])

    out: dict = {"bench": "cpu_prepack", "quick": args.quick, "threads": args.threads, "new_tokens": new_tokens}
    for rows in ROWS:
        t = interleaved({name: job(name, rows) for name in engines}, repeats=args.repeats)
        out[f"plain_s_rows{rows}"] = round(median(t["plain"]), 4)
        out[f"speedup_rows{rows}"] = round(median(t["plain"]) / median(t["prepacked"]), 3)
    t = interleaved({name: prefill(name) for name in engines}, repeats=args.repeats)
    out["prefill_speedup_512"] = round(median(t["plain"]) / median(t["prepacked"]), 3)
    out["extra_mib"] = round(extra / 2**20, 1)
    emit(out)


if __name__ == "__main__":
    main()
