"""Durability: kill -9 the server, start it again on the same state, nothing hangs or is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tests.conftest import TEST_HOME
from tests.e2e.conftest import TINY, free_port
from tests.e2e.test_tinker_sdk_basic import BATCH
from tests.e2e.test_tinker_sdk_errors import _fwdbwd_body

ADAM = types.AdamParams(learning_rate=1e-2, eps=1e-8)
pytestmark = pytest.mark.slow


def spawn(state_dir, port):
    env = {**os.environ, "LORAFLEET_HOME": str(TEST_HOME), "OMP_NUM_THREADS": "1",
           "LORAFLEET_DATABASE_URL": f"sqlite:///{state_dir}/catalog.db",
           "LORAFLEET_STORE_URL": str(state_dir / "store")}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from lorafleet.cli import main; sys.exit(main())", "serve", "--base", TINY, "--port", str(port),
         "--state-dir", str(state_dir), "--threads", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180  # a start is ~15 s alone, ~50 s on a loaded 2-core machine
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode()[-3000:])
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def test_kill_restart_resume_matches_uninterrupted(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    proc, url = spawn(state, free_port())
    try:
        tc = tinker.ServiceClient(base_url=url).create_lora_training_client(
            base_model=TINY, rank=4).result()
        for _ in range(2):
            tc.forward_backward(BATCH, "cross_entropy").result()
            tc.optim_step(ADAM).result()
        path = tc.save_state("before-kill").result().path
        # the uninterrupted run's next step
        tc.forward_backward(BATCH, "cross_entropy").result()
        tc.optim_step(ADAM).result()
        expected = tc.forward(BATCH, "cross_entropy").result().metrics["loss:sum"]
        # work that will be lost: queued behind a seq gap, so it never runs before the kill
        lost = httpx.post(f"{url}/api/v1/forward_backward",
                          content=_fwdbwd_body(tc.model_id, 1000),
                          headers={"Content-Type": "application/x-protobuf", "X-API-Key": "tml-x"})
        lost_id = lost.json()["request_id"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    proc, url = spawn(state, free_port())
    try:
        r = httpx.post(f"{url}/api/v1/retrieve_future", json={"request_id": lost_id},
                       headers={"X-API-Key": "tml-x"})
        assert r.status_code == 200 and "restarted" in r.json()["error"]
        rest = tinker.RestClient(base_url=url)
        assert path in [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints]
        # the old run's adapter is gone from memory: a clear 404, not a hang
        old = httpx.post(f"{url}/api/v1/forward_backward", content=_fwdbwd_body(tc.model_id, 1001),
                         headers={"Content-Type": "application/x-protobuf", "X-API-Key": "tml-x"})
        assert old.status_code == 404 and "checkpoint" in old.text
        resumed = tinker.ServiceClient(base_url=url) \
            .create_training_client_from_state_with_optimizer(path).result()
        resumed.forward_backward(BATCH, "cross_entropy").result()
        resumed.optim_step(ADAM).result()
        got = resumed.forward(BATCH, "cross_entropy").result().metrics["loss:sum"]
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
