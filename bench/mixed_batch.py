"""Mixed-adapter decoding throughput: lorafleet vs its base, PEFT mixed batches, PEFT switching.

SmolLM2-135M-Instruct, fp32, 8 chat-templated prompts of different lengths (35 to 50 tokens),
greedy, every row made to produce exactly 64 new tokens (EOS stopping off; --quick: 16 tokens,
2 rounds). Variants, all timed in one process, interleaved, medians over repeats:

    base_lorafleet   (a) lorafleet engine, the 8 rows with no adapter
    base_hf          reference: transformers `generate` on the plain (un-injected) base
    mixed_lorafleet  (b) lorafleet, 8 rows with 8 distinct rank-8 adapters on q,k,v,o
    peft_mixed       (c) PEFT + `generate(adapter_names=[...])`, the same 8 adapters, one batch
    peft_switching   (d) PEFT `set_adapter` per adapter, one `generate` per row

Prints one JSON line: tokens/s of each, mixed_over_base = b/a (target >= 0.90),
mixed_over_peft_mixed = b/c (>= 1.5), mixed_over_peft_switching = b/d (>= 4).

    .venv/bin/python bench/mixed_batch.py [--quick] [--threads 2]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from _common import (
    ATTN, SMOL, emit, interleaved, median, note, parse_args, random_adapter, set_threads,
)

QUESTIONS = [
    "What is the capital of France?",
    "Explain in simple terms why the sky is blue during the day and red at sunset.",
    "Name three prime numbers.",
    "Write a short poem about a cat who likes to sleep in the sun all afternoon.",
    "How do I reverse a list in Python? Give an example.",
    "What are the main differences between a virus and a bacterium, and how are infections by "
    "each treated?",
    "Translate 'good morning' into Spanish.",
    "Give me two tips for writing clear documentation for a software library used by other teams.",
]


def chat_prompts(tokenizer) -> list[list[int]]:
    out = []
    for q in QUESTIONS:
        messages = [{"role": "user", "content": q}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        out.append(list(ids))
    return out


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    set_threads(args.threads)
    from peft import PeftModel

    from lorafleet.config import paths_from_env
    from lorafleet.engine import Engine, SampleRequest, SamplingParams
    from lorafleet.lora.io import write_peft_dir
    from lorafleet.lora.spec import LoraSpec
    from lorafleet.model import load_base

    n_new = 16 if args.quick else 64
    paths = paths_from_env()
    t0 = time.perf_counter()
    engine = Engine(load_base(SMOL, paths))
    plain = load_base(SMOL, paths).model  # reference base, not injected
    peft_base = load_base(SMOL, paths).model  # PEFT wraps its own copy
    tok = engine.base.tokenizer
    eos = engine.base.eos_token_id
    prompts = chat_prompts(tok)
    spec = LoraSpec(rank=8, alpha=16, target_modules=ATTN)
    handles = [
        engine.create_adapter(spec, weights=random_adapter(engine.info, spec, seed=i))
        for i in range(len(prompts))
    ]
    tmp = Path(tempfile.mkdtemp(prefix="lorafleet-bench-"))
    for i, h in enumerate(handles):
        write_peft_dir(engine.get_weights(h), SMOL, tmp / f"a{i}")
    peft = PeftModel.from_pretrained(peft_base, str(tmp / "a0"), adapter_name="a0")
    for i in range(1, len(handles)):
        peft.load_adapter(str(tmp / f"a{i}"), adapter_name=f"a{i}")
    peft.eval()
    names = [f"a{i}" for i in range(len(handles))]
    note(f"loaded 3 copies of the base + {len(handles)} adapters in "
         f"{time.perf_counter() - t0:.1f}s; prompt lengths {[len(p) for p in prompts]}")

    greedy = SamplingParams(max_tokens=n_new, temperature=0, stop_token_ids=())
    ids, mask = left_pad(prompts, eos)
    hf_kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=eos,
                 temperature=None, top_p=None, top_k=None)
    outputs: dict[str, list[list[int]]] = {}

    def ours(name: str, adapters: list[int | None]):
        def run():
            reqs = [SampleRequest(h, p, 1, greedy) for h, p in zip(adapters, prompts)]
            outputs[name] = [r.sequences[0].tokens for r in engine.sample(reqs)]
        return run

    @torch.no_grad()
    def base_hf():
        out = plain.generate(input_ids=ids, attention_mask=mask, **hf_kw)
        outputs["base_hf"] = out[:, ids.shape[1]:].tolist()

    @torch.no_grad()
    def peft_mixed():
        out = peft.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **hf_kw)
        outputs["peft_mixed"] = out[:, ids.shape[1]:].tolist()

    @torch.no_grad()
    def peft_switching():
        rows = []
        for name, p in zip(names, prompts):
            peft.set_adapter(name)
            x = torch.tensor([p])
            out = peft.generate(input_ids=x, attention_mask=torch.ones_like(x), **hf_kw)
            rows.append(out[0, len(p):].tolist())
        outputs["peft_switching"] = rows

    fns = {
        "base_lorafleet": ours("base_lorafleet", [None] * len(prompts)),
        "base_hf": base_hf,
        "mixed_lorafleet": ours("mixed_lorafleet", handles),
        "peft_mixed": peft_mixed,
        "peft_switching": peft_switching,
    }
    times = interleaved(fns, args.repeats, warmup=1)
    for name, rows in outputs.items():
        assert all(len(r) == n_new for r in rows), f"{name}: not every row produced {n_new} tokens"
    n_tok = len(prompts) * n_new
    tps = {name: n_tok / median(ts) for name, ts in times.items()}

    def same(x: str, y: str) -> int:
        """Rows equal up to the first EOS in either (HF's min_new_tokens masks EOS; ours
        emits it and goes on)."""
        def agree(a: list[int], b: list[int]) -> bool:
            k = min(r.index(eos) if eos in r else len(r) for r in (a, b))
            return a[:k] == b[:k]
        return sum(agree(a, b) for a, b in zip(outputs[x], outputs[y]))

    emit({
        "bench": "mixed_batch",
        "model": SMOL,
        "dtype": "float32",
        "threads": args.threads,
        "quick": args.quick,
        "repeats": args.repeats,
        "rows": len(prompts),
        "new_tokens": n_new,
        "adapter": "rank 8, alpha 16, q_proj k_proj v_proj o_proj",
        "mixed_over_base": tps["mixed_lorafleet"] / tps["base_lorafleet"],
        "mixed_over_peft_mixed": tps["mixed_lorafleet"] / tps["peft_mixed"],
        "mixed_over_peft_switching": tps["mixed_lorafleet"] / tps["peft_switching"],
        "base_lorafleet_over_base_hf": tps["base_lorafleet"] / tps["base_hf"],
        "tokens_per_s": tps,
        "median_s": {name: median(ts) for name, ts in times.items()},
        "all_s": times,
        # greedy rows token-identical up to the first EOS (fp32 rounding may flip a near-tie)
        "identical_rows": {
            "base_lorafleet_vs_base_hf": same("base_lorafleet", "base_hf"),
            "mixed_lorafleet_vs_peft_mixed": same("mixed_lorafleet", "peft_mixed"),
            "mixed_lorafleet_vs_peft_switching": same("mixed_lorafleet", "peft_switching"),
        },
    })


if __name__ == "__main__":
    main()
