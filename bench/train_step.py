"""Training-step time: fused multi-adapter steps vs sequential ones, and lorafleet vs PEFT.

SmolLM2-135M-Instruct, fp32, LoRA rank 8 / alpha 16 on q_proj k_proj v_proj o_proj, loss =
summed token cross-entropy (weights 1), AdamW (lr 1e-4, betas 0.9/0.95, eps 1e-12, no decay).
One step = forward_backward + optim_step. Variants, all timed in one process, interleaved,
medians over repeats, at short rows (32 tokens) and long rows (256; --quick: 64):

    fused_L       one forward_backward holding 4 adapters x 2 rows, then 4 optim_steps
    sequential_L  4 x (forward_backward of one adapter's 2 rows, then its optim_step)
    single_L      lorafleet, one adapter, 2 rows
    peft_L        the same step in PEFT: PeftModel (same adapter weights) + torch.optim.AdamW

Prints one JSON line: fused_over_sequential (speed-up at 32 tokens, target >= 1.5),
fused_over_sequential_256 (reported), single_over_peft (speed-up at 32 tokens, target >= 1.0),
single_over_peft_256, and the median seconds of every variant.

    .venv/bin/python bench/train_step.py [--quick] [--threads 2]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import (
    ATTN, SMOL, emit, interleaved, median, note, parse_args, random_adapter, set_threads,
)

N_ADAPTERS, ROWS = 4, 2
HP = dict(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.0)


def rows(seed: int, n_tokens: int, vocab: int):
    """ROWS datums of n_tokens random ids: input, target (shifted), weights 1."""
    from lorafleet.train.types import Datum

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(ROWS):
        seq = torch.randint(3, vocab, (n_tokens + 1,), generator=g)
        out.append(Datum(seq[:-1], {"target_tokens": seq[1:], "weights": torch.ones(n_tokens)}))
    return out


def peft_step(peft, opt, data):
    """The PEFT twin of one lorafleet step on `data`: summed CE, backward, AdamW."""
    tokens = torch.stack([d.tokens for d in data])
    targets = torch.stack([d.loss_inputs["target_tokens"] for d in data]).flatten()

    def loss():
        logits = peft(input_ids=tokens, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets, reduction="sum")

    def run():
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run, loss


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    set_threads(args.threads)
    from peft import PeftModel

    from lorafleet.config import paths_from_env
    from lorafleet.engine import Engine
    from lorafleet.lora.io import write_peft_dir
    from lorafleet.lora.spec import LoraSpec
    from lorafleet.model import load_base
    from lorafleet.train.types import AdamParams, FwdBwdRequest

    lengths = (32, 64 if args.quick else 256)
    paths = paths_from_env()
    t0 = time.perf_counter()
    engine = Engine(load_base(SMOL, paths))
    spec = LoraSpec(rank=8, alpha=16, target_modules=ATTN)

    def adapter(seed: int) -> int:
        return engine.create_adapter(spec, weights=random_adapter(engine.info, spec, seed=seed))

    handles = [adapter(i) for i in range(N_ADAPTERS)]
    single = adapter(99)
    tmp = Path(tempfile.mkdtemp(prefix="lorafleet-bench-"))
    write_peft_dir(engine.get_weights(single), SMOL, tmp / "single")
    peft_base = load_base(SMOL, paths).model  # PEFT wraps its own copy
    peft = PeftModel.from_pretrained(peft_base, str(tmp / "single"), is_trainable=True)
    trainable = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        trainable, lr=HP["learning_rate"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
        weight_decay=HP["weight_decay"],
    )
    hp = AdamParams(**HP)
    vocab = engine.info.vocab_size
    data = {n: [rows(100 * n + i, n, vocab) for i in range(N_ADAPTERS)] for n in lengths}
    note(f"loaded in {time.perf_counter() - t0:.1f}s; "
         f"{sum(p.numel() for p in trainable)} trainable params per adapter")

    def fused(n):
        def run():
            engine.forward_backward([FwdBwdRequest(h, d) for h, d in zip(handles, data[n])])
            for h in handles:
                engine.optim_step(h, hp)
        return run

    def sequential(n):
        def run():
            for h, d in zip(handles, data[n]):
                engine.forward_backward([FwdBwdRequest(h, d)])
                engine.optim_step(h, hp)
        return run

    def ours_single(n):
        def run():
            engine.forward_backward([FwdBwdRequest(single, data[n][0])])
            engine.optim_step(single, hp)
        return run

    # the same step: before any update both compute the same loss on the same rows
    (ref,) = engine.forward_backward([FwdBwdRequest(single, data[32][0], forward_only=True)])
    with torch.no_grad():
        loss_diff = abs(ref.metrics["loss:sum"] - float(peft_step(peft, opt, data[32][0])[1]()))

    fns = {}
    for n in lengths:
        fns[f"fused_{n}"] = fused(n)
        fns[f"sequential_{n}"] = sequential(n)
        fns[f"single_{n}"] = ours_single(n)
        fns[f"peft_{n}"] = peft_step(peft, opt, data[n][0])[0]
    times = interleaved(fns, args.repeats, warmup=1)
    med = {name: median(ts) for name, ts in times.items()}
    long = lengths[1]
    emit({
        "bench": "train_step",
        "model": SMOL,
        "dtype": "float32",
        "threads": args.threads,
        "quick": args.quick,
        "repeats": args.repeats,
        "adapter": "rank 8, alpha 16, q_proj k_proj v_proj o_proj",
        "adapters_x_rows": f"{N_ADAPTERS} x {ROWS}",
        "fused_over_sequential": med["sequential_32"] / med["fused_32"],
        f"fused_over_sequential_{long}": med[f"sequential_{long}"] / med[f"fused_{long}"],
        "single_over_peft": med["peft_32"] / med["single_32"],
        f"single_over_peft_{long}": med[f"peft_{long}"] / med[f"single_{long}"],
        "median_s": med,
        "all_s": times,
        "first_loss_abs_diff_vs_peft": loss_diff,
    })


if __name__ == "__main__":
    main()
