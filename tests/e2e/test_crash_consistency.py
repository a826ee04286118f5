"""Crash consistency of all state: a real `lorafleet serve` is SIGKILLed at random points while a
client saves state and sampler weights, deletes checkpoints, records evaluations and moves
aliases; after each kill it restarts on the same home, and then:

- `lorafleet fsck --state-dir` is clean (catalog blobs and Tinker checkpoint folders);
- every listed checkpoint and every catalog revision is whole (weights_info / files answer);
- every future the client held answers (done or an error) within a bound: never a hang.

The catalog runs on SQLite and on PostgreSQL. `bench/crash_kills.py` runs the same cycle with
more kills; resume == an uninterrupted run is tests/e2e/test_tinker_restart.py.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.catalog.backends import BACKENDS, database_url
from tests.conftest import TEST_HOME
from tests.e2e.conftest import TINY, free_port

KILLS_PER_BACKEND = int(os.environ.get("LORAFLEET_CRASH_KILLS", "5"))
FWD = {"data": [{"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
                 "loss_fn_inputs": {"target_tokens": {"data": [2, 3, 4], "dtype": "int64", "shape": [3]},
                                    "weights": {"data": [1.0, 1.0, 1.0], "dtype": "float32", "shape": [3]}}}],
       "loss_fn": "cross_entropy"}
pytestmark = pytest.mark.slow


# A server start is mostly `import torch`: a zygote process imports lorafleet once and forks a
# fresh `lorafleet serve` for every start (no threads exist in it before the fork).
ZYGOTE = """
import os, signal, sys
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed servers are reaped at once
from lorafleet.cli import main
import lorafleet.api.app, lorafleet.engine, lorafleet.model  # noqa: the heavy imports
from lorafleet.config import paths_from_env
lorafleet.model.load_base(sys.argv[1], paths_from_env())  # and the lazy ones (transformers)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os._exit(main(line.split()) or 0)
    print(pid, flush=True)
"""


class Servers:
    def __init__(self, home, db_url: str) -> None:
        self.home, self.db_url = home, db_url
        env = {**os.environ, "LORAFLEET_HOME": str(TEST_HOME), "OMP_NUM_THREADS": "1",
               "LORAFLEET_DATABASE_URL": db_url, "LORAFLEET_STORE_URL": str(home / "store")}
        self.log = open(home / "server.log", "a")  # noqa: SIM115 (closed in close())
        self.zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE, TINY], env=env, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.pid = 0

    def start(self, *extra: str) -> str:
        port = free_port()
        self.zygote.stdin.write(f"serve --base {TINY} --port {port} --state-dir {self.home / 'tinker'} "
                                f"--threads 1 {' '.join(extra)}\n")
        self.zygote.stdin.flush()
        self.pid = int(self.zygote.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not start; see {self.home / 'server.log'}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pid, sig)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)
        raise RuntimeError(f"server {self.pid} did not exit")

    def close(self) -> None:
        self.zygote.stdin.close()
        self.zygote.wait(30)
        self.log.close()


class Client:
    """Drives one training run through every state-changing operation, remembering each future
    it was handed; stops at the first connection error (the kill)."""

    def __init__(self, url: str, seed: int) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)
        self.rng = random.Random(seed)
        self.futures: list[str] = []
        self.committed = threading.Event()  # set once a checkpoint is saved
        self.seq = 0

    def submit(self, path: str, body: dict) -> dict:
        r = self.http.post(path, json=body)
        r.raise_for_status()
        out = r.json()
        if "request_id" in out:
            self.futures.append(out["request_id"])
        return out

    def result(self, fut: dict) -> dict:
        while True:
            r = self.http.post("/api/v1/retrieve_future", json={"request_id": fut["request_id"]}).json()
            if r.get("type") != "try_again":
                return r

    def step(self, run: str, body: dict, path: str) -> dict:
        self.seq += 1
        return self.submit(path, {"model_id": run, "seq_id": self.seq, **body})

    def run(self) -> None:
        try:
            session = self.submit("/api/v1/create_session", {})["session_id"]
            run = self.result(self.submit("/api/v1/create_model", {
                "session_id": session, "base_model": TINY, "lora_config": {"rank": 4}}))["model_id"]
            for i in range(10_000):
                self.step(run, {"forward_backward_input": FWD}, "/api/v1/forward_backward")
                self.step(run, {"adam_params": {"learning_rate": 1e-3}}, "/api/v1/optim_step")
                state = self.step(run, {"path": f"s{i}"}, "/api/v1/save_weights")
                sampler = self.result(self.step(run, {"path": f"w{i}"}, "/api/v1/save_weights_for_sampler"))
                self.committed.set()
                if "path" in sampler:
                    ref = sampler["path"]
                    self.http.post("/catalog/v1/evaluations", json={"ref": ref, "suite": "crash",
                                                                    "metrics": {"step": float(i)}})
                    rev = self.http.get("/catalog/v1/resolve", params={"ref": ref})
                    if rev.status_code == 200:
                        policy = rev.json()["policy"]
                        self.http.put(f"/catalog/v1/policies/{policy}/aliases/prod", json={"ref": ref})
                if i and self.rng.random() < 0.5:
                    self.http.delete(f"/api/v1/training_runs/{run}/checkpoints/weights/s{i - 1}")
                if self.rng.random() < 0.3:
                    self.result(state)
        except httpx.HTTPError:
            return  # the server was killed


def _check_after_restart(url: str, held: list[str]) -> int:
    http = httpx.Client(base_url=url, timeout=30)
    # every future the client held answers promptly: done, or an error saying why
    for request_id in held:
        deadline = time.time() + 30
        while True:
            r = http.post("/api/v1/retrieve_future", json={"request_id": request_id})
            assert r.status_code == 200, r.text
            if r.json().get("type") != "try_again":
                break
            assert time.time() < deadline, f"future {request_id} still pending after restart"
    # every listed checkpoint is whole
    cps = http.get("/api/v1/checkpoints", params={"limit": 10_000}).json()["checkpoints"]
    for cp in cps:
        info = http.post("/api/v1/weights_info", json={"tinker_path": cp["tinker_path"]})
        assert info.status_code == 200, (cp, info.text)
    return len(cps)


def fsck(home, db_url: str, monkeypatch, capsys) -> None:
    from lorafleet.cli import main

    monkeypatch.setenv("LORAFLEET_DATABASE_URL", db_url)
    monkeypatch.setenv("LORAFLEET_STORE_URL", str(home / "store"))
    code = main(["fsck", "--state-dir", str(home / "tinker")])
    out = capsys.readouterr().out
    assert code == 0, out


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_during_saves_deletes_and_catalog_writes(backend, tmp_path, monkeypatch, capsys):
    rng = random.Random(18)
    home = tmp_path / "home"
    home.mkdir()
    with database_url(backend, tmp_path) as db_url:
        servers = Servers(home, db_url)
        url = servers.start()
        survived = 0
        try:
            for kill in range(KILLS_PER_BACKEND):
                client = Client(url, seed=kill)
                worker = threading.Thread(target=client.run, daemon=True)
                worker.start()
                assert client.committed.wait(120), "the client saved nothing within 120 s"
                time.sleep(rng.uniform(0.0, 1.0))
                servers.kill()
                worker.join(60)
                assert not worker.is_alive(), "the client hung on a killed server"
                fsck(home, db_url, monkeypatch, capsys)  # the home as the kill left it
                url = servers.start()
                _check_after_restart(url, client.futures)
                survived += 1
        finally:
            servers.kill(signal.SIGTERM)
            servers.close()
        fsck(home, db_url, monkeypatch, capsys)
        print(f"{backend}: {survived} kills survived")
