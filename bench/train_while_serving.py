"""Training interleaved with decoding (issue 11): inter-token latency of streaming chats with
and without a concurrent fused SFT job, and the training throughput it keeps, in one run.

A real lorafleet server (uvicorn on loopback, in a thread) on HuggingFaceTB/SmolLM2-135M-Instruct.
Chats: 8 concurrent streaming /v1/completions of 256 tokens on the base (quick: 64), run in
rounds back to back. Training: one fused SFT job, 4 runs x 8 datums x 256 tokens (quick:
4 x 2 x 128), submitted as typed forward_backward jobs to the same engine's scheduler, which
splits it into micro-batches of `--micro-batch-tokens` on its training lane while its decode
lane serves the chats (engine/scheduler.py). Measured:
chats alone, training alone, then both at once (chat rounds continue until training ends).
Prints ONE JSON line.

    OMP_NUM_THREADS=1 python bench/train_while_serving.py --quick
    OMP_NUM_THREADS=1 python bench/train_while_serving.py

Keys: itl_p50_ms_{alone,training}, itl_p99_ms_{alone,training}, itl_p99_ratio (target <= 2),
train_tok_s_{alone,serving}, train_throughput_ratio (serving / alone; target >= 0.5),
micro_batch_tokens, chat_rounds_during_training.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

import httpx  # noqa: E402
import torch  # noqa: E402

from lorafleet.config import Paths  # noqa: E402
from lorafleet.engine.jobs import CreateRun, ForwardBackward, Job, WorkKind  # noqa: E402
from lorafleet.lora.spec import LoraSpec  # noqa: E402
from lorafleet.train.types import Datum  # noqa: E402

PROMPTS = ["Write a short poem about the sea.", "Explain what a LoRA adapter is.",
           "List three uses of a hammer.", "Tell me a story about a fox."]


class Waiter:
    """A sink that sets an event per job."""

    def __init__(self) -> None:
        self.events: dict[int, threading.Event] = {}
        self.errors: list[Exception] = []

    def event(self, job: Job) -> threading.Event:
        return self.events.setdefault(id(job), threading.Event())

    def done(self, job, result) -> None:
        self.event(job).set()

    def failed(self, job, error) -> None:
        self.errors.append(error)
        self.event(job).set()

    def on_token(self, *a) -> None:
        pass


def train_once(runner, sink: Waiter, runs: list[str], datums: int, length: int, seq: int) -> float:
    """One fused SFT step: a forward_backward job per run, all queued at once; seconds."""
    g = torch.Generator().manual_seed(seq)
    jobs = []
    for run in runs:
        data = []
        for _ in range(datums):
            toks = torch.randint(100, runner.base.info.vocab_size, (length + 1,), generator=g)
            data.append(Datum(toks[:-1], {"target_tokens": toks[1:], "weights": torch.ones(length)}))
        jobs.append(Job(WorkKind.FORWARD_BACKWARD, ForwardBackward(data, fingerprint=f"{run}{seq}"), sink,
                        run_id=run, seq_id=seq))
    t0 = time.perf_counter()
    for job in jobs:
        runner.submit(job)
    for job in jobs:
        sink.event(job).wait()
    if sink.errors:
        raise sink.errors[0]
    return time.perf_counter() - t0


async def chat_round(url: str, n: int, max_tokens: int) -> list[float]:
    async with httpx.AsyncClient(timeout=1800) as client:
        res = await asyncio.gather(*(c.stream_completion(
            client, url, {"model": c.SMOL, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                          "temperature": 1.0, "seed": i}, time.perf_counter()) for i in range(n)))
    return [g for r in res for g in r["gaps"]]


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--micro-batch-tokens", type=int, default=256)
    args = ap.parse_args()
    c.set_threads(args.threads)
    datums, length, chat_tokens = (2, 128, 64) if args.quick else (8, 256, 256)
    home = Path(os.environ.get("LORAFLEET_HOME", Path(__file__).resolve().parents[1] / ".lorafleet-test"))
    with tempfile.TemporaryDirectory() as tmp:
        paths = Paths(home=home, database_url=f"sqlite:///{tmp}/catalog.db", store_url=f"{tmp}/store")
        app, server, url = c.serve(paths, Path(tmp) / "tinker", micro_batch_tokens=args.micro_batch_tokens)
        runner = app.state.openai.runners[c.SMOL]
        sink = Waiter()
        runs = [f"bench-{i}" for i in range(4)]
        for run in runs:
            job = Job(WorkKind.CREATE_RUN, CreateRun(LoraSpec(rank=8), seed=0), sink, run_id=run)
            runner.submit(job)
            sink.event(job).wait()
        loop = asyncio.new_event_loop()
        loop.run_until_complete(chat_round(url, 2, 4))  # warm-up
        train_once(runner, sink, runs, 1, 16, seq=1)
        gaps_alone = loop.run_until_complete(chat_round(url, 8, chat_tokens))
        c.note(f"chats alone: {len(gaps_alone)} gaps")
        train_alone = train_once(runner, sink, runs, datums, length, seq=2)
        c.note(f"training alone: {train_alone:.1f} s")
        box: dict[str, float] = {}
        trainer = threading.Thread(target=lambda: box.update(s=train_once(runner, sink, runs, datums, length, seq=3)))
        trainer.start()
        gaps_training: list[float] = []
        rounds = 0
        while trainer.is_alive() or rounds == 0:
            gaps_training += loop.run_until_complete(chat_round(url, 8, chat_tokens))
            rounds += 1
        trainer.join()
        c.note(f"training while serving: {box['s']:.1f} s, {rounds} chat rounds")
        c.stop(server)
    tokens = len(runs) * datums * length
    p99_alone, p99_training = c.percentile(gaps_alone, 0.99), c.percentile(gaps_training, 0.99)
    c.emit({
        "bench": "train_while_serving", "base": c.SMOL, "quick": args.quick,
        "micro_batch_tokens": args.micro_batch_tokens, "train_tokens": tokens, "chat_tokens": chat_tokens,
        "itl_p50_ms_alone": 1000 * c.percentile(gaps_alone, 0.5),
        "itl_p50_ms_training": 1000 * c.percentile(gaps_training, 0.5),
        "itl_p99_ms_alone": 1000 * p99_alone, "itl_p99_ms_training": 1000 * p99_training,
        "itl_p99_ratio": p99_training / p99_alone,
        "train_tok_s_alone": tokens / train_alone, "train_tok_s_serving": tokens / box["s"],
        "train_throughput_ratio": train_alone / box["s"],
        "chat_rounds_during_training": rounds, "torch_threads": torch.get_num_threads(),
    })


if __name__ == "__main__":
    main()
