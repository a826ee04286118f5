"""The engine thread survives its clients and its own bugs, says when it is stuck, and lets the
server stop: streams closed early, an engine bug in one turn, /healthz and /readyz, SIGTERM with
a stream open. Real server on loopback, real `openai` and `tinker` SDKs, a real Engine subclass.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import tinker
from tinker import types

from lorafleet.engine import Engine
from tests.conftest import TEST_HOME
from tests.e2e.conftest import TINY, free_port, start_server

PROMPT_S = 30.0  # what "quickly" means on a shared 2-core machine: far below any hang


class FaultyEngine(Engine):
    """The real engine on its own tiny-llama, with two switches a test can throw.

    drop_results: the next decoder forward raises (a bug inside the scheduler's decode step).
    gate: while cleared, every decoder forward waits on it (a stuck engine).
    """

    def __init__(self, base):
        super().__init__(base)
        self.drop_results = False
        self.gate = threading.Event()
        self.gate.set()
        self.blocked = threading.Event()  # set once a decoder forward waits on the gate

    def decode_forward(self, **inputs):
        if not self.gate.is_set():
            self.blocked.set()
            self.gate.wait()
        if self.drop_results:
            self.drop_results = False
            raise RuntimeError("injected engine bug")
        return super().decode_forward(**inputs)


@pytest.fixture(scope="module")
def live(paths, tmp_path_factory):
    from lorafleet.model import load_base

    base = load_base(TINY, paths)
    engine = FaultyEngine(base)
    server = start_server(paths, [TINY], tmp_path_factory.mktemp("liveness"), engines={TINY: (base, engine)},
                          hold_s=5.0, stall_s=1.0)
    server.engine = engine
    yield server
    engine.gate.set()
    server.stop()


def oai(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="tml-x", max_retries=0, timeout=PROMPT_S)


def quick_checks(live) -> None:
    """A completion, a Tinker call and /healthz all answer promptly."""
    t0 = time.monotonic()
    r = oai(live).completions.create(model=TINY, prompt="Hello", max_tokens=2, temperature=0.0)
    assert r.choices[0].text is not None
    tinker.ServiceClient(base_url=live.url).create_lora_training_client(base_model=TINY, rank=4).result(
        timeout=PROMPT_S)
    health = httpx.get(f"{live.url}/healthz")
    assert health.status_code == 200, health.text
    assert health.json()["engines"][TINY]["alive"]
    assert time.monotonic() - t0 < PROMPT_S


def test_streams_closed_early_leave_the_engine_serving(live):
    c = oai(live)
    for _ in range(3):  # minutes of generation each, unless closing the stream stops its rows
        stream = c.completions.create(model=TINY, prompt="Once upon a time", max_tokens=2000, n=4,
                                      temperature=1.0, stream=True)
        for i, _chunk in enumerate(stream):
            if i == 1:
                break
        stream.close()
    # and a chat stream, and a client that leaves before reading anything
    stream = c.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2000, n=4, temperature=1.0, stream=True)
    next(iter(stream))
    stream.close()
    with httpx.stream("POST", f"{live.url}/v1/completions", json={
            "model": TINY, "prompt": "x", "max_tokens": 2000, "n": 4, "stream": True}) as r:
        assert r.status_code == 200
    quick_checks(live)


def test_an_engine_bug_fails_its_request_and_the_engine_keeps_serving(live):
    sc = tinker.ServiceClient(base_url=live.url).create_sampling_client(base_model=TINY).result()
    prompt = types.ModelInput.from_ints([1, 2, 3])
    params = types.SamplingParams(max_tokens=3, temperature=0.0)
    live.engine.drop_results = True
    t0 = time.monotonic()
    with pytest.raises(Exception, match="internal error [0-9a-f]+; see server log"):
        sc.sample(prompt, num_samples=1, sampling_params=params).result(timeout=PROMPT_S)
    assert time.monotonic() - t0 < PROMPT_S
    assert len(sc.sample(prompt, num_samples=1, sampling_params=params).result(timeout=PROMPT_S).sequences) == 1
    quick_checks(live)


def test_healthz_reports_a_stuck_engine(live):
    live.engine.blocked.clear()
    live.engine.gate.clear()
    done = threading.Event()

    def request() -> None:
        oai(live).completions.create(model=TINY, prompt="Hello", max_tokens=4, temperature=0.0)
        done.set()

    threading.Thread(target=request, daemon=True).start()
    try:
        assert live.engine.blocked.wait(PROMPT_S)
        deadline = time.monotonic() + PROMPT_S
        while (health := httpx.get(f"{live.url}/healthz")).status_code == 200:  # stall_s is 1 s
            assert time.monotonic() < deadline, health.text
            time.sleep(0.1)
        assert health.status_code == 503
        state = health.json()["engines"][TINY]
        assert state["alive"] and state["pending"] and state["progress_age_s"] > 1.0
        assert httpx.get(f"{live.url}/readyz").status_code == 503
    finally:
        live.engine.gate.set()
    assert done.wait(PROMPT_S)
    assert httpx.get(f"{live.url}/healthz").status_code == 200
    assert httpx.get(f"{live.url}/readyz").status_code == 200


def test_readyz_fails_until_the_engines_run(paths, tiny_pair, tmp_path):
    import asyncio

    from lorafleet.api.app import ServeConfig, create_app
    from lorafleet.config import Paths

    own = Paths(home=paths.home, database_url=f"sqlite:///{tmp_path / 'catalog.db'}", store_url=str(tmp_path / "store"))
    app = create_app(ServeConfig(bases=[TINY], paths=own, state_dir=tmp_path, engines={TINY: tiny_pair}))

    async def probe() -> tuple[int, int]:  # the app, before its lifespan started the engines
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.1") as c:
            return (await c.get("/readyz")).status_code, (await c.get("/healthz")).status_code

    assert asyncio.run(probe()) == (503, 503)
    live = start_server(paths, [TINY], tmp_path / "live", engines={TINY: tiny_pair})
    try:
        assert httpx.get(f"{live.url}/readyz").status_code == 200
        assert httpx.get(f"{live.url}/healthz").status_code == 200
    finally:
        live.stop()


def test_sigterm_stops_the_server_with_a_stream_open(tmp_path):
    """`lorafleet serve` exits within a bound after SIGTERM; the open stream ends with an error
    event at once instead of holding the shutdown open until its generation ends."""
    port = free_port()
    env = dict(os.environ, LORAFLEET_HOME=str(TEST_HOME), OMP_NUM_THREADS="1",
               LORAFLEET_DATABASE_URL=f"sqlite:///{tmp_path / 'catalog.db'}", LORAFLEET_STORE_URL=str(tmp_path / "store"))
    proc = subprocess.Popen([sys.executable, "-m", "lorafleet", "serve", "--base", TINY, "--port", str(port),
                             "--state-dir", str(tmp_path / "tinker"), "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        # a long generation: 8 samples of ~2000 tokens take minutes here
        body = {"model": TINY, "prompt": "Hello", "max_tokens": 2000, "n": 8, "temperature": 1.0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "shutting down" in json.loads(events[-2])["error"]["message"]
        proc.wait(timeout=30)
        assert time.monotonic() - t0 < 30
        assert proc.returncode in (0, -signal.SIGTERM), proc.stdout.read()  # uvicorn re-raises the signal
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
