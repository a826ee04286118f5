"""Two `lorafleet serve` processes over one PostgreSQL database and one store folder share the
Tinker state (issue 16): a future created through server A is retrieved through server B; B
lists A's runs and checkpoints (real tinker SDK), samples A's checkpoint, serves A's signed
download URLs; when A dies, the future it was computing fails promptly through B (never a hang).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import tinker
from tinker import types

from tests.catalog.backends import database_url
from tests.conftest import TEST_HOME
from tests.e2e.conftest import TINY, free_port
from tests.e2e.test_crash_consistency import FWD

H = {"X-API-Key": "tml-x"}
pytestmark = pytest.mark.slow


def spawn(home, db_url: str, name: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "LORAFLEET_HOME": str(TEST_HOME), "OMP_NUM_THREADS": "1",
           "LORAFLEET_DATABASE_URL": db_url, "LORAFLEET_STORE_URL": str(home / "store")}
    log = open(home / f"{name}.log", "w")  # noqa: SIM115 (the process owns it)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from lorafleet.cli import main; sys.exit(main())", "serve",
         "--base", TINY, "--port", str(port), "--state-dir", str(home / name), "--threads", "1"],
        env=env, stdout=log, stderr=log)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, log) -> None:
    deadline = time.time() + 180  # two servers start at once on a shared 2-core machine
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"server did not start: {log.read_text()[-3000:]}")


def result(http: httpx.Client, request_id: str, bound_s: float = 120.0) -> dict:
    deadline = time.time() + bound_s
    while True:
        r = http.post("/api/v1/retrieve_future", json={"request_id": request_id})
        assert r.status_code == 200, r.text
        if r.json().get("type") != "try_again":
            return r.json()
        assert time.time() < deadline, f"future {request_id} still pending after {bound_s} s"


def test_two_servers_share_sessions_runs_futures_and_checkpoints(tmp_path):
    with database_url("postgresql", tmp_path) as db_url:
        (pa, url_a), (pb, url_b) = spawn(tmp_path, db_url, "a"), spawn(tmp_path, db_url, "b")
        try:
            wait_ready(pa, url_a, tmp_path / "a.log")
            wait_ready(pb, url_b, tmp_path / "b.log")
            a = httpx.Client(base_url=url_a, headers=H, timeout=60)
            b = httpx.Client(base_url=url_b, headers=H, timeout=60)

            # a session and a training run through A; the create_model future retrieved through B
            session = a.post("/api/v1/create_session", json={}).json()["session_id"]
            created = a.post("/api/v1/create_model", json={
                "session_id": session, "base_model": TINY, "lora_config": {"rank": 4}}).json()
            run = result(b, created["request_id"])["model_id"]
            assert run == created["model_id"]
            # a retry through B of the same call is the same future (idempotent across servers)
            again = b.post("/api/v1/create_model", json={
                "session_id": session, "base_model": TINY, "lora_config": {"rank": 4}}).json()
            assert again["request_id"] == created["request_id"]

            # training futures through A, results (protobuf-backed JSON, JSON) through B
            fwd = a.post("/api/v1/forward_backward", json={
                "model_id": run, "seq_id": 1, "forward_backward_input": FWD}).json()
            opt = a.post("/api/v1/optim_step", json={
                "model_id": run, "seq_id": 2, "adam_params": {"learning_rate": 1e-3}}).json()
            save = a.post("/api/v1/save_weights", json={"model_id": run, "seq_id": 3, "path": "s1"}).json()
            sampler = a.post("/api/v1/save_weights_for_sampler", json={
                "model_id": run, "seq_id": 4, "path": "w1"}).json()
            assert "loss:sum" in result(b, fwd["request_id"])["metrics"]
            assert result(b, opt["request_id"])["type"] == "optim_step"
            state_path = result(b, save["request_id"])["path"]
            sampler_path = result(b, sampler["request_id"])["path"]

            # B lists A's run and its checkpoints, with the real SDK
            rest = tinker.RestClient(base_url=url_b)
            runs = rest.list_training_runs().result().training_runs
            assert run in [r.training_run_id for r in runs]
            listed = [c.tinker_path for c in rest.list_checkpoints(run).result().checkpoints]
            assert state_path in listed and sampler_path in listed
            assert rest.get_training_run(run).result().last_checkpoint.tinker_path == state_path
            info = rest.get_weights_info_by_tinker_path(state_path).result()
            assert info.base_model == TINY and info.lora_rank == 4
            assert b.get(f"/api/v1/sessions/{session}").json()["training_run_ids"] == [run]
            # B samples A's checkpoint: the bytes come from the one shared store
            sc = tinker.ServiceClient(base_url=url_b).create_sampling_client(model_path=sampler_path).result()
            assert sc.sample(types.ModelInput.from_ints([1, 2]), 1,
                             types.SamplingParams(max_tokens=2)).result().sequences
            # a download URL signed by A is served by B (the signing secret lives in the database)
            urls = a.get(f"/api/v1/training_runs/{run}/checkpoints/weights/s1/external_weights_urls").json()
            link = urls["urls"]["adapter_model.safetensors"].replace(url_a, url_b)
            got = httpx.get(link, timeout=60)
            assert got.status_code == 200 and len(got.content) > 0
            # unpublish/publish and delete through B act on A's rows
            assert b.post(f"/api/v1/training_runs/{run}/checkpoints/weights/s1/publish").status_code == 200
            assert [c.public for c in rest.list_checkpoints(run).result().checkpoints
                    if c.tinker_path == state_path] == [True]
            assert b.delete(f"/api/v1/training_runs/{run}/checkpoints/sampler_weights/w1").status_code == 200
            assert sampler_path not in [c.tinker_path for c in
                                        tinker.RestClient(base_url=url_a).list_checkpoints(run).result().checkpoints]

            # work A will never finish (queued behind a seq gap); A dies; B fails it promptly
            stuck = a.post("/api/v1/optim_step", json={
                "model_id": run, "seq_id": 99, "adam_params": {"learning_rate": 1e-3}}).json()
            pa.send_signal(signal.SIGKILL)
            pa.wait(30)
            t0 = time.time()
            lost = result(b, stuck["request_id"], bound_s=20)
            assert "work was lost" in lost["error"] and lost["category"] == "server"
            assert time.time() - t0 < 20
            # what A saved outlives A
            assert state_path in [c.tinker_path for c in rest.list_checkpoints(run).result().checkpoints]
        finally:
            for p in (pa, pb):
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    p.wait(30)
