"""GRPO for several policies at once over one base, through the public tinker SDK only.

Each policy is its own training run on `lorafleet serve`. A step of one policy:
  1. save the adapter for sampling (`save_weights_for_sampler`: an immutable revision in the
     catalog) and open a sampling client on exactly those weights (adapter-only handoff);
  2. sample `group_size` completions for each of `batch_size` arithmetic prompts;
  3. reward each completion (0.5 for the strict format "just the number", 0.5 for the right
     value) and take group-relative advantages  A = r - mean(r_group);
  4. `forward_backward` with `importance_sampling` (or `ppo`) and `optim_step`.
The K policies run concurrently (asyncio), so the server batches their sampling into shared
decode batches and fuses their forward_backward calls into shared training batches
(`--serial-fwdbwd` keeps those apart: flat server memory, no wall-time cost on CPU; see
docs/BENCHMARKS.md). Sampling is seeded per (policy, step, prompt): a policy learns the same
thing whether it runs alongside others or alone.

Run (after `make run` in another shell):
    .venv/bin/python recipes/grpo.py --policies 3 --steps 20
Outputs in --out (default out/grpo): rewards.csv, rewards.png; the best revision of each
policy gets an evaluation record and the alias `best` in the catalog.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import os
import random
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import tinker
from tinker import types
from tqdm import tqdm

OPS = {"add": ("+", lambda a, b: a + b), "sub": ("-", lambda a, b: a - b), "mul": ("*", lambda a, b: a * b)}
_INT = re.compile(r"-?\d+")


@dataclass
class Config:
    base_url: str = "http://127.0.0.1:8000"
    base_model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    policies: int = 3
    steps: int = 20
    group_size: int = 8
    batch_size: int = 4  # prompts per step
    rank: int = 8
    learning_rate: float = 1e-3  # Adam; 20 steps at 1e-3 take SmolLM2 from ~0.05 to ~0.5 (the format)
    loss_fn: str = "importance_sampling"  # or "ppo"
    max_tokens: int = 12
    temperature: float = 1.0
    seed: int = 0  # policy i: LoRA init seed + i, its own problem stream and sampling seeds
    task: str = "cycle"  # "cycle": policy i gets add/sub/mul in turn; or one of add, sub, mul for all
    out: Path = Path("out/grpo")
    name_prefix: str = "grpo"
    # one forward_backward in flight at a time: the server then cannot fuse the K policies'
    # batches, which caps its peak memory at one policy's logits (K x tokens x vocab otherwise)
    serial_fwdbwd: bool = False
    quiet: bool = False


@dataclass
class Policy:
    """One training run: its task (an operation), client handles and reward history."""

    index: int
    op: str
    rank: int = 8
    seed: int = 0
    training: object = None
    tokenizer: object = None
    rng: random.Random = field(default_factory=random.Random)
    rewards: list[float] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # sampler revision per step
    last_logprobs: list[float] = field(default_factory=list)
    fwdbwd_gate: object = None  # shared asyncio.Lock when Config.serial_fwdbwd


def reward(completion: str, answer: int) -> float:
    """0.5 for answering with just an integer, 0.5 for the right value (first integer)."""
    text = completion.strip()
    r = 0.5 if _INT.fullmatch(text) else 0.0
    first = _INT.search(text)
    if first and int(first.group()) == answer:
        r += 0.5
    return r


def group_advantages(rewards_G: list[float]) -> list[float]:
    """GRPO: each sample's reward minus its group's mean (no std scaling: stable at small G)."""
    mean = statistics.fmean(rewards_G)
    return [r - mean for r in rewards_G]


def make_policies(cfg: Config) -> list[Policy]:
    """The K policies of a run: policy i has seed cfg.seed + i and its task by cfg.task."""
    ops = list(OPS)
    out = []
    for i in range(cfg.policies):
        op = ops[i % len(ops)] if cfg.task == "cycle" else cfg.task
        out.append(Policy(i, op, rank=cfg.rank, seed=cfg.seed + i, rng=random.Random((cfg.seed + i) * 1000 + i)))
    return out


def sample_seed(policy: Policy, step: int, prompt_index: int) -> int:
    """Sampling is seeded per (policy, step, prompt), so a run replays the same way whether its
    policy shares decode batches with others or runs alone."""
    return (policy.seed * 1_000_003 + policy.index * 10_007 + step * 101 + prompt_index) % (2**31)


def make_problem(policy: Policy) -> tuple[str, int]:
    sym, fn = OPS[policy.op]
    a, b = policy.rng.randint(1, 9), policy.rng.randint(1, 9)
    return f"What is {a} {sym} {b}? Answer with just the number.", fn(a, b)


def prompt_tokens(tokenizer, question: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_dict=False)
    return list(ids)


def build_datum(prompt: list[int], completion: list[int], logprobs: list[float], advantage: float) -> types.Datum:
    """Input = prompt + completion[:-1]; prompt positions carry zero advantage (no loss)."""
    tokens = prompt + completion
    n_prompt = len(prompt) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "logprobs": [0.0] * n_prompt + list(logprobs),
            "advantages": [0.0] * n_prompt + [advantage] * len(completion),
        },
    )


async def policy_step(cfg: Config, service, policy: Policy, step: int) -> float:
    """One GRPO step of one policy; returns its mean reward."""
    saved = await policy.training.save_weights_for_sampler(f"{cfg.name_prefix}-p{policy.index}-step{step:04d}")
    policy.paths.append(saved.path)
    sampler = await service.create_sampling_client(model_path=saved.path)
    problems = [make_problem(policy) for _ in range(cfg.batch_size)]
    prompts = [prompt_tokens(policy.tokenizer, q) for q, _ in problems]
    results = await asyncio.gather(*[
        sampler.sample(types.ModelInput.from_ints(p), num_samples=cfg.group_size,
                       sampling_params=types.SamplingParams(
                           max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                           stop=[policy.tokenizer.eos_token_id], seed=sample_seed(policy, step, j)))
        for j, p in enumerate(prompts)
    ])
    data, all_rewards = [], []
    for prompt, (_, answer), res in zip(prompts, problems, results):
        texts = [policy.tokenizer.decode(s.tokens, skip_special_tokens=True) for s in res.sequences]
        rewards_G = [reward(t, answer) for t in texts]
        all_rewards += rewards_G
        for seq, adv in zip(res.sequences, group_advantages(rewards_G)):
            if adv != 0.0:
                data.append(build_datum(prompt, list(seq.tokens), list(seq.logprobs), adv))
    policy.last_logprobs = list(results[0].sequences[0].logprobs)
    if data:  # a step where every group agreed has no signal
        async with policy.fwdbwd_gate or contextlib.nullcontext():
            await policy.training.forward_backward(data, cfg.loss_fn)
        await policy.training.optim_step(types.AdamParams(learning_rate=cfg.learning_rate, beta1=0.9, beta2=0.95, eps=1e-8))
    mean = statistics.fmean(all_rewards)
    policy.rewards.append(mean)
    return mean


async def train(cfg: Config, policies: list[Policy] | None = None) -> list[Policy]:
    """Train `policies` (default: make_policies(cfg)) concurrently for cfg.steps steps.

    Pass a subset to run policies one after another with the same problems and seeds.
    """
    service = tinker.ServiceClient(base_url=cfg.base_url)
    policies = make_policies(cfg) if policies is None else policies
    gate = asyncio.Lock() if cfg.serial_fwdbwd else None
    for p in policies:
        p.fwdbwd_gate = gate
        p.training = await service.create_lora_training_client(
            base_model=cfg.base_model, rank=p.rank, seed=p.seed,
            user_metadata={"recipe": "grpo", "task": p.op, "policy": str(p.index), "rank": str(p.rank)},
        )
        p.tokenizer = p.training.get_tokenizer()
    bar = tqdm(range(cfg.steps), desc=f"GRPO x{len(policies)}", disable=cfg.quiet)
    for step in bar:
        means = await asyncio.gather(*[policy_step(cfg, service, p, step) for p in policies])
        bar.set_postfix_str(" ".join(f"{p.op}={m:.2f}" for p, m in zip(policies, means)))
    return policies


def record_best(cfg: Config, policies: list[Policy]) -> list[dict]:
    """Evaluation record + alias `best` for each policy's best revision (catalog HTTP API)."""
    key = os.environ.get("TINKER_API_KEY", "tml-local")
    out = []
    with httpx.Client(base_url=cfg.base_url, headers={"X-API-Key": key}, timeout=30) as http:
        for p in policies:
            best = max(range(len(p.rewards)), key=lambda i: (p.rewards[i], i))
            ref = p.paths[best]
            http.post("/catalog/v1/evaluations", json={"ref": ref, "suite": f"grpo-{p.op}", "metrics": {"reward": p.rewards[best]}}).raise_for_status()
            policy = http.get("/catalog/v1/resolve", params={"ref": ref}).raise_for_status().json()["policy"]
            http.put(f"/catalog/v1/policies/{policy}/aliases/best", json={
                "ref": ref, "reason": f"best mean reward {p.rewards[best]:.3f} at step {best}",
            }).raise_for_status()
            out.append({"policy": p.index, "op": p.op, "best_step": best, "reward": p.rewards[best], "ref": ref})
    return out


def save_outputs(cfg: Config, policies: list[Policy]) -> None:
    cfg.out.mkdir(parents=True, exist_ok=True)
    with (cfg.out / "rewards.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", *[f"policy{p.index}_{p.op}" for p in policies]])
        for step in range(cfg.steps):
            w.writerow([step, *[f"{p.rewards[step]:.4f}" for p in policies]])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for p in policies:
        ax.plot(range(cfg.steps), p.rewards, marker="o", ms=3, label=f"policy {p.index} ({p.op})")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward (max 1.0)")
    ax.set_title(f"{cfg.policies} policies on {cfg.base_model.split('/')[-1]}, rank {cfg.rank}")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(cfg.out / "rewards.png", dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> Config:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Config()
    for name, value in vars(d).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            ap.add_argument(flag, action="store_true")
        else:
            ap.add_argument(flag, type=type(value), default=value)
    return Config(**vars(ap.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    os.environ.setdefault("TINKER_API_KEY", "tml-local")
    t0 = time.time()
    policies = asyncio.run(train(cfg))
    save_outputs(cfg, policies)
    best = record_best(cfg, policies)
    for b in best:
        print(f"policy {b['policy']} ({b['op']}): best mean reward {b['reward']:.2f} at step {b['best_step']} -> {b['ref']} (alias best)")
    print(f"done in {time.time() - t0:.0f} s; curves in {cfg.out}/rewards.png and rewards.csv")


if __name__ == "__main__":
    main()
