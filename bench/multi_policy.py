"""K GRPO policies concurrently vs one after another on the same server config. Prints ONE JSON line.

    python bench/multi_policy.py            # SmolLM2, K=3 x 3 steps, group 4 x 2 prompts
    python bench/multi_policy.py --quick    # tiny-llama, K=3 x 3 steps

Each mode gets a fresh `lorafleet serve` subprocess (same flags, own catalog and state), and
runs the recipe's own functions (recipes/grpo.py): `concurrent` trains the K policies in one
asyncio loop (the server fuses their forward_backward calls and batches their samples across
adapters); `sequential` trains policy 0, then 1, then 2, each alone. Same problems, same LoRA
init seeds, same sampling seeds in both modes, so each policy should learn the same thing.
Keys: wall_speedup = sequential / concurrent wall seconds (target >= 1.77, MinT's 4B figure);
peak_rss_ratio = server VmHWM concurrent / sequential (target <= 1.10); final_reward_* per
policy and mode (the mean of the last step), max_final_reward_diff; the server's CPU seconds and
mean rows per engine call (sample / train) in each mode. `--serial-fwdbwd` keeps the policies'
forward_backward calls apart (the recipe's option), which shows what fusing them costs in memory.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import SMOL, emit, note  # noqa: E402

TINY = "lorafleet/tiny-llama"


class Server:
    """`lorafleet serve` as a subprocess with its own catalog, store and state (home shared, for
    the cached base models); its peak RSS is read from /proc/<pid>/status (VmHWM)."""

    def __init__(self, base: str, threads: int, workdir: Path, port: int):
        workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TINKER_TELEMETRY="0", HF_HUB_OFFLINE="1",
                   LORAFLEET_DATABASE_URL=f"sqlite:///{workdir / 'catalog.db'}",
                   LORAFLEET_STORE_URL=str(workdir / "store"))
        self.url = f"http://127.0.0.1:{port}"
        self.log = (workdir / "server.log").open("w")
        self.proc = subprocess.Popen(
            [str(ROOT / ".venv/bin/lorafleet"), "serve", "--base", base, "--port", str(port),
             "--threads", str(threads), "--state-dir", str(workdir / "tinker")],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {workdir / 'server.log'}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.5)

    def status(self, field: str) -> int:
        """A /proc/<pid>/status field in bytes (VmHWM: peak resident set, VmRSS: now)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def cpu_s(self) -> float:
        """User + system CPU seconds the server process has used (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def batch_rows(self) -> dict[str, float]:
        """Mean rows per engine call by kind, from the server's /metrics histogram."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        sums, counts = {}, {}
        for line in text.splitlines():
            for suffix, into in (("_sum", sums), ("_count", counts)):
                if line.startswith("lorafleet_batch_rows" + suffix + "{"):
                    kind = line.split('kind="', 1)[1].split('"', 1)[0]
                    into[kind] = float(line.rsplit(" ", 1)[1])
        return {k: sums[k] / counts[k] for k in counts if counts[k]} | {f"{k}_calls": counts[k] for k in counts}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mode(mode: str, cfg, threads: int, workdir: Path) -> dict:
    from recipes import grpo

    server = Server(cfg.base_model, threads, workdir / mode, free_port())
    try:
        cfg.base_url = server.url
        rss_idle = server.status("VmHWM")
        cpu0 = server.cpu_s()
        t0 = time.perf_counter()
        if mode == "concurrent":
            policies = asyncio.run(grpo.train(cfg))
        else:
            policies = []
            for p in grpo.make_policies(cfg):
                policies += asyncio.run(grpo.train(cfg, [p]))
        wall = time.perf_counter() - t0
        peak = server.status("VmHWM")
        cpu = server.cpu_s() - cpu0
        rows = server.batch_rows()
    finally:
        server.stop()
    return {"wall_s": wall, "peak_rss": peak, "rss_after_load": rss_idle, "server_cpu_s": cpu,
            "batch_rows": rows,
            "rewards": [p.rewards for p in policies]}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny-llama, under ~2 minutes")
    ap.add_argument("--threads", type=int, default=1, help="server torch threads (default 1)")
    ap.add_argument("--policies", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--serial-fwdbwd", action="store_true",
                    help="recipe's serial_fwdbwd: no fused forward_backward across policies")
    ap.add_argument("--order", default="sequential,concurrent", help="modes, in this order")
    args = ap.parse_args()
    os.environ.setdefault("TINKER_API_KEY", "tml-local")
    from recipes import grpo

    cfg = grpo.Config(base_model=TINY if args.quick else SMOL, policies=args.policies, steps=args.steps,
                      group_size=4, batch_size=2, max_tokens=8, learning_rate=1e-3, quiet=True,
                      name_prefix="mp", serial_fwdbwd=args.serial_fwdbwd)
    workdir = Path(tempfile.mkdtemp(prefix="lorafleet-multi-policy-"))
    res = {}
    for mode in args.order.split(","):
        note(f"{mode}: {cfg.policies} policies x {cfg.steps} steps on {cfg.base_model}")
        res[mode] = run_mode(mode, cfg, args.threads, workdir)
        note(f"{mode}: {res[mode]['wall_s']:.1f} s, peak RSS {res[mode]['peak_rss'] / 2**20:.0f} MiB")
    seq, con = res["sequential"], res["concurrent"]
    final_seq = [r[-1] for r in seq["rewards"]]
    final_con = [r[-1] for r in con["rewards"]]
    emit({
        "bench": "multi_policy", "base": cfg.base_model, "policies": cfg.policies, "steps": cfg.steps,
        "group_size": cfg.group_size, "batch_size": cfg.batch_size, "max_tokens": cfg.max_tokens,
        "threads": args.threads, "serial_fwdbwd": args.serial_fwdbwd,
        "sequential_s": seq["wall_s"], "concurrent_s": con["wall_s"],
        "wall_speedup": seq["wall_s"] / con["wall_s"],
        "peak_rss_sequential_mib": seq["peak_rss"] / 2**20, "peak_rss_concurrent_mib": con["peak_rss"] / 2**20,
        "peak_rss_ratio": con["peak_rss"] / seq["peak_rss"],
        "final_reward_sequential": final_seq, "final_reward_concurrent": final_con,
        "max_final_reward_diff": max(abs(a - b) for a, b in zip(final_seq, final_con)),
        "reward_curves_identical": seq["rewards"] == con["rewards"],
        # where the speed-up comes from: server CPU seconds (same work, fewer seconds = batching
        # efficiency) vs wall (idle gaps filled), and mean rows per engine call
        "server_cpu_s_sequential": seq["server_cpu_s"], "server_cpu_s_concurrent": con["server_cpu_s"],
        "server_busy_sequential": seq["server_cpu_s"] / seq["wall_s"],
        "server_busy_concurrent": con["server_cpu_s"] / con["wall_s"],
        "batch_rows_sequential": seq["batch_rows"], "batch_rows_concurrent": con["batch_rows"],
        "mean_reward_sequential": [sum(r) / len(r) for r in seq["rewards"]],
        "mean_reward_concurrent": [sum(r) / len(r) for r in con["rewards"]],
    })


if __name__ == "__main__":
    main()
