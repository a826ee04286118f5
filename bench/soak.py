"""Soak and overload: a bounded asyncio load generator against a live `lorafleet serve --auth
keys` (tiny-llama, its own process). Three tenants each run a Tinker training loop
(forward_backward + optim_step, a sampler save every 5 steps), a Tinker sampling loop (bursts
of 6 requests, over the per-tenant `--max-queued 4`: overload, 429s) and an OpenAI streaming loop, all at once, for `--duration-s`. Prints ONE JSON line:

- `futures` submitted / resolved / `lost` (must be 0): every future answers, done or an error;
- `429` count and `429_without_retry_after` (must be 0); a 429 is retried after its Retry-After;
- `errors`: any other non-2xx, or a failed future, or a broken stream (must be 0);
- p50/p99 latency per operation (ms), and the server's RSS: after warm-up, at the end, growth.

    python bench/soak.py                    # 600 s (the benchmark; growth target <= 10 %)
    python bench/soak.py --duration-s 60    # the CI length (tests/e2e/test_soak.py)
    python bench/soak.py --quick            # 30 s, the same keys
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx  # noqa: E402

TINY = "lorafleet/tiny-llama"
TENANTS = ("t1", "t2", "t3")
FWD = {"data": [{"model_input": {"chunks": [{"type": "encoded_text", "tokens": list(range(1, 33))}]},
                 "loss_fn_inputs": {"target_tokens": {"data": list(range(2, 34)), "dtype": "int64",
                                                      "shape": [32]}}}],
       "loss_fn": "cross_entropy"}
BURST = 6  # concurrent sampling requests per tenant
PROMPT = {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3, 4]}]}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Load:
    def __init__(self, url: str, keys: dict[str, str], until: float) -> None:
        self.url, self.keys, self.until = url, keys, until
        self.latency: dict[str, list[float]] = {}
        self.stats = {"futures_submitted": 0, "futures_resolved": 0, "429": 0,
                      "429_without_retry_after": 0, "errors": 0, "streams": 0}
        self.error_samples: list[str] = []

    def _error(self, what: str) -> None:
        self.stats["errors"] += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(what[:300])

    async def call(self, http: httpx.AsyncClient, op: str, path: str, body: dict) -> dict | None:
        """POST until accepted (429s wait their Retry-After); the answer, or None on an error."""
        while True:
            t0 = time.perf_counter()
            r = await http.post(path, json=body)
            if r.status_code == 429:
                self.stats["429"] += 1
                retry = r.headers.get("retry-after")
                if retry is None:
                    self.stats["429_without_retry_after"] += 1
                await asyncio.sleep(min(float(retry or 1), 5.0))
                continue
            if r.status_code >= 300:
                self._error(f"{op}: {r.status_code} {r.text}")
                return None
            out = r.json()
            if "request_id" in out:
                self.stats["futures_submitted"] += 1
                out = await self.result(http, out["request_id"], op)
            self.latency.setdefault(op, []).append(time.perf_counter() - t0)
            return out

    async def result(self, http: httpx.AsyncClient, request_id: str, op: str) -> dict | None:
        deadline = time.time() + 120
        while time.time() < deadline:
            r = await http.post("/api/v1/retrieve_future", json={"request_id": request_id})
            out = r.json()
            if out.get("type") == "try_again":
                continue
            self.stats["futures_resolved"] += 1
            if "error" in out:
                self._error(f"{op} future: {out}")
                return None
            return out
        return None  # lost: counted as submitted but not resolved

    async def trainer(self, tenant: str) -> None:
        async with httpx.AsyncClient(base_url=self.url, headers={"X-API-Key": self.keys[tenant]},
                                     timeout=120) as http:
            session = (await http.post("/api/v1/create_session", json={})).json()["session_id"]
            run = await self.call(http, "create_model", "/api/v1/create_model", {
                "session_id": session, "base_model": TINY, "lora_config": {"rank": 4}})
            if run is None:
                return
            seq = step = 0
            while time.time() < self.until:
                step += 1
                seq += 1
                await self.call(http, "forward_backward", "/api/v1/forward_backward",
                                {"model_id": run["model_id"], "seq_id": seq, "forward_backward_input": FWD})
                seq += 1
                await self.call(http, "optim_step", "/api/v1/optim_step",
                                {"model_id": run["model_id"], "seq_id": seq,
                                 "adam_params": {"learning_rate": 1e-4}})
                if step % 5 == 0:
                    seq += 1
                    await self.call(http, "save_weights_for_sampler", "/api/v1/save_weights_for_sampler",
                                    {"model_id": run["model_id"], "seq_id": seq, "path": f"w{seq}"})
            await http.post(f"/api/v1/sessions/{session}/finish", json={})

    async def sampler(self, tenant: str) -> None:
        async with httpx.AsyncClient(base_url=self.url, headers={"X-API-Key": self.keys[tenant]},
                                     timeout=120) as http:
            body = {"base_model": TINY, "prompt": PROMPT, "num_samples": 2,
                    "sampling_params": {"max_tokens": 8, "temperature": 1.0}}
            while time.time() < self.until:  # bursts of BURST: over a small max_queued, 429s
                await asyncio.gather(*(self.call(http, "asample", "/api/v1/asample", body)
                                       for _ in range(BURST)))

    async def streamer(self, tenant: str) -> None:
        async with httpx.AsyncClient(base_url=self.url, headers={"X-API-Key": self.keys[tenant]},
                                     timeout=120) as http:
            while time.time() < self.until:
                t0 = time.perf_counter()
                async with http.stream("POST", "/v1/completions", json={
                        "model": TINY, "prompt": "hello", "max_tokens": 8, "stream": True}) as r:
                    if r.status_code == 429:
                        self.stats["429"] += 1
                        if "retry-after" not in r.headers:
                            self.stats["429_without_retry_after"] += 1
                        await asyncio.sleep(min(float(r.headers.get("retry-after", 1)), 5.0))
                        continue
                    if r.status_code != 200:
                        self._error(f"stream: {r.status_code} {(await r.aread()).decode()}")
                        continue
                    lines = [line async for line in r.aiter_lines() if line.startswith("data:")]
                events = [json.loads(x[5:]) for x in lines[:-1]] if lines else []
                if not lines or lines[-1].strip() != "data: [DONE]" or any("error" in e for e in events):
                    self._error(f"stream ended badly: {lines[-2:]}")
                    continue
                self.stats["streams"] += 1
                self.latency.setdefault("stream", []).append(time.perf_counter() - t0)

    async def run(self) -> None:
        await asyncio.gather(*(f(t) for t in TENANTS for f in (self.trainer, self.sampler, self.streamer)))


def soak(url: str, pid: int, keys: dict[str, str], duration_s: float) -> dict:
    """Drive the load for `duration_s`; the figures (see the module docstring)."""
    start = time.time()
    load = Load(url, keys, start + duration_s)
    samples: list[int] = []

    async def main() -> None:
        async def watch() -> None:
            while time.time() < load.until:
                samples.append(rss_bytes(pid))
                await asyncio.sleep(1.0)

        await asyncio.gather(load.run(), watch())

    asyncio.run(main())
    warm = samples[max(0, len(samples) // 10)] if samples else 0  # after warm-up (first 10 %)
    end = rss_bytes(pid)
    out = dict(load.stats)
    out["lost"] = out["futures_submitted"] - out["futures_resolved"]
    for op, xs in sorted(load.latency.items()):
        xs = sorted(xs)
        out[f"{op}_n"] = len(xs)
        out[f"{op}_p50_ms"] = round(1000 * statistics.median(xs), 1)
        out[f"{op}_p99_ms"] = round(1000 * xs[min(len(xs) - 1, int(0.99 * len(xs)))], 1)
    out.update(duration_s=round(time.time() - start, 1), rss_warm_mb=round(warm / 2**20, 1),
               rss_end_mb=round(end / 2**20, 1),
               rss_growth_pct=round(100 * (end - warm) / warm, 2) if warm else None,
               error_samples=load.error_samples)
    return out


def run_soak(duration_s: float, max_queued: int) -> dict:
    """A fresh home and server (`--auth keys --max-queued N`), three tenants, `soak` on it."""
    from lorafleet.catalog import Catalog
    from tests.e2e.test_crash_consistency import Servers

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        db_url = f"sqlite:///{home / 'catalog.db'}"
        cat = Catalog.open(db_url, str(home / "store"))
        keys = {t: cat.create_key(t) for t in TENANTS}
        cat.close()
        servers = Servers(home, db_url)
        url = servers.start("--auth", "keys", "--max-queued", str(max_queued))
        try:
            out = soak(url, servers.pid, keys, duration_s)
            out["server_alive"] = httpx.get(f"{url}/healthz", timeout=30).status_code == 200
        finally:
            servers.kill()
            servers.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration-s", type=float, default=600.0)
    ap.add_argument("--max-queued", type=int, default=4, help="per-tenant queue quota (429s)")
    ap.add_argument("--quick", action="store_true", help="30 s instead of 600 (same keys)")
    args = ap.parse_args()
    if args.quick:
        args.duration_s = 30.0
    print(json.dumps(run_soak(args.duration_s, args.max_queued), sort_keys=True))


if __name__ == "__main__":
    main()
