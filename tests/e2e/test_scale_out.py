"""Scale-out on Ray (lorafleet/fleet/, docs/scale-out.md): one control plane, 2 engine actors of
tiny-llama on a real local Ray runtime, driven by the real openai and tinker SDKs.

One module-scoped server (Ray startup and two engine processes are slow on 2 cores); the tests
run in order: the runtime listens on loopback only; both engines serve, an adapter's requests
stay on one engine while adapters spread; killing an engine's process (its pid from
/admin/v1/engines) fails its in-flight work at once with a retryable error, the next requests
succeed on the other engine, a training run that lived there names its last checkpoint and
resumes from it on the other engine; Ray restarts the dead engine and it serves again.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from lorafleet.catalog.records import ADMIN
from tests.conftest import TEST_HOME
from tests.e2e.conftest import TINY, free_port
from tests.e2e.test_openai_serving import SPEC, adapter_weights

pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
pytestmark = pytest.mark.slow

N_ADAPTERS = 12
HEADERS = {"X-API-Key": "tml-lorafleet-test"}


@dataclass
class Scaled:
    url: str
    proc: subprocess.Popen
    revs: list[str]
    log: Path
    texts: dict = field(default_factory=dict)
    where: dict = field(default_factory=dict)
    victim: dict = field(default_factory=dict)
    ray_pids: set = field(default_factory=set)


@pytest.fixture(scope="module")
def scaled(paths, tmp_path_factory):
    """`lorafleet serve --engines 2` (the CLI, in its own process) over a catalog that already
    holds N_ADAPTERS adapters."""
    from lorafleet.catalog.service import Catalog
    from lorafleet.model import load_base

    tmp = tmp_path_factory.mktemp("scale")
    db, store = f"sqlite:///{tmp / 'catalog.db'}", str(tmp / "store")
    catalog = Catalog.open(db, store)
    info = load_base(TINY, paths).info
    revs = []
    for i in range(N_ADAPTERS):
        catalog.create_policy(ADMIN, f"local/s{i}", TINY, SPEC)
        revs.append(catalog.publish_weights(ADMIN, f"local/s{i}", adapter_weights(info, i), aliases=["prod"]).id)
    catalog.close()
    port = free_port()
    env = {**os.environ, "LORAFLEET_HOME": str(TEST_HOME), "OMP_NUM_THREADS": "1",
           "LORAFLEET_DATABASE_URL": db, "LORAFLEET_STORE_URL": store}
    log = tmp / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from lorafleet.cli import main; sys.exit(main())", "serve",
         "--base", TINY, "--port", str(port), "--state-dir", str(tmp / "state"), "--threads", "1",
         "--engines", "2", "--engine-threads", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # Ray and two engine processes, on 2 busy cores
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start: {log.read_text()[-3000:]}")
        time.sleep(0.5)
    live = Scaled(url, proc, revs, log)
    yield live
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    deadline = time.time() + 60  # the local runtime ends with its server: no process left behind
    while (left := [p for p in live.ray_pids if os.path.exists(f"/proc/{p}")]) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes outlived the server: {left}"


def engines(live) -> list[dict]:
    r = httpx.get(f"{live.url}/admin/v1/engines", headers=HEADERS, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def client(live, retries: int = 4) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="tml-lorafleet-test", max_retries=retries,
                         timeout=120)


def complete(live, model: str, max_tokens: int = 4) -> str:
    return client(live).completions.create(model=model, prompt="Hello", max_tokens=max_tokens,
                                           temperature=0.0).choices[0].text


def listening(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, local address) of every listening TCP socket of those processes (ss -ltnp)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        cols = line.split()
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            if pid in pids:
                found.append((pid, cols[3]))
    return found


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> set[int]:
    """Every process under `root` (the server: its Ray GCS, raylet, agents, engine workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(parent(int(entry)), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def test_local_ray_listens_on_loopback_only_with_token_auth(scaled):
    pids = {e["pid"] for e in engines(scaled)}
    tree = descendants(scaled.proc.pid)
    assert pids <= tree  # the engines run under this server's own runtime
    raylet = parent(next(iter(pids)))
    with open(f"/proc/{raylet}/cmdline", "rb") as f:
        cmdline = f.read().decode(errors="replace").replace("\0", " ")
    assert re.search(r"/lorafleet-ray-[^/\s]+/session_", cmdline), cmdline[:300]  # its own temp dir
    scaled.ray_pids = tree
    sockets = listening(tree | {scaled.proc.pid})
    assert len(sockets) >= 4, sockets  # the API, GCS, raylet, workers: not vacuous
    exposed = [(p, a) for p, a in sockets if not a.startswith(("127.", "[::1]:", "[::ffff:127."))]
    assert not exposed, f"Ray listens beyond loopback: {exposed}"
    with open(f"/proc/{raylet}/environ", "rb") as f:
        assert b"RAY_AUTH_MODE=disabled" not in f.read()  # token authentication stays on
    assert "Token authentication is enabled" in scaled.log.read_text()


def test_the_control_plane_loads_no_base_weights(scaled):
    text = scaled.log.read_text()
    assert f"loaded base {TINY}" in text and "no weights, the engines hold them" in text, text[-2000:]


def test_both_engines_serve_and_adapters_stay_on_one_engine(scaled):
    listed = engines(scaled)
    assert [e["id"] for e in listed] == [f"{TINY}#0", f"{TINY}#1"]
    assert all(e["alive"] and e["pid"] and e["node"] and e["base"] == TINY for e in listed)
    assert len({e["pid"] for e in listed}) == 2 and os.getpid() not in {e["pid"] for e in listed}
    texts = {}
    for rev in scaled.revs:
        outs = {complete(scaled, f"local/s{scaled.revs.index(rev)}@{rev}") for _ in range(3)}
        assert len(outs) == 1  # greedy, on one engine's copy of the adapter
        texts[rev] = outs.pop()
    listed = engines(scaled)
    where = {rev: [e["id"] for e in listed if rev in e["resident"]] for rev in scaled.revs}
    assert all(len(ids) == 1 for ids in where.values()), where  # affinity: never loaded twice
    assert {ids[0] for ids in where.values()} == {f"{TINY}#0", f"{TINY}#1"}, where  # spread
    # the first request of each adapter missed, the two repeats found it resident
    assert sum(e["sample_misses"] for e in listed) == N_ADAPTERS
    assert sum(e["sample_hits"] for e in listed) == 2 * N_ADAPTERS
    metrics = httpx.get(f"{scaled.url}/metrics", headers=HEADERS).text
    assert f'lorafleet_engine_alive{{base="{TINY}",engine="{TINY}#1"}} 1.0' in metrics
    scaled.texts, scaled.where = texts, where
    # structured output: the grammar crosses to the engine actor as its spec (llguidance
    # matchers do not pickle) and is compiled there; a random model, so only the mask fits it
    for rev in scaled.revs[:2]:
        out = client(scaled).completions.create(
            model=f"local/s{scaled.revs.index(rev)}@{rev}", prompt="Hello", max_tokens=12, temperature=1.0,
            extra_body={"structured_outputs": {"regex": "[a-z]{3}-[0-9]{2}"}}).choices[0].text
        assert re.fullmatch("[a-z]{3}-[0-9]{2}", out), out


def test_killed_engine_fails_in_flight_work_then_traffic_and_training_move(scaled):
    import tinker
    from tinker import types

    from tests.e2e.test_tinker_sdk_basic import BATCH

    tc = tinker.ServiceClient(base_url=scaled.url).create_lora_training_client(base_model=TINY, rank=4).result()
    tc.forward_backward(BATCH, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    path = tc.save_state("before-kill").result().path
    # a sampler version that only the control plane holds (fresh from training): shipped to the
    # engine that samples it
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt, greedy = types.ModelInput.from_ints([1, 5, 9]), types.SamplingParams(max_tokens=6, temperature=0.0)
    sampled = sampler.sample(prompt, num_samples=1, sampling_params=greedy).result().sequences[0].tokens
    victim = next(e for e in engines(scaled) if tc.model_id in e["runs"])
    rev = next(r for r, ids in scaled.where.items() if ids == [victim["id"]])
    model = f"local/s{scaled.revs.index(rev)}@{rev}"

    answers: list[httpx.Response] = []
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 400, "n": 8, "temperature": 1.0}
    thread = threading.Thread(target=lambda: answers.append(
        httpx.post(f"{scaled.url}/v1/completions", json=body, headers=HEADERS, timeout=120)))
    thread.start()
    deadline = time.time() + 60
    while not next(e for e in engines(scaled) if e["id"] == victim["id"])["queue_depth"]:
        assert time.time() < deadline, "the request never reached its engine"
        time.sleep(0.05)
    os.kill(victim["pid"], signal.SIGKILL)
    thread.join(timeout=120)
    assert answers, "the in-flight request hung"
    r = answers[0]
    assert r.status_code == 503, r.text  # retryable: the openai SDK retries it
    assert int(r.headers["Retry-After"]) >= 1
    assert "died" in r.json()["error"]["message"]

    # the next request for that adapter is served by the other engine (loaded from the store)
    assert complete(scaled, model) == scaled.texts[rev]
    after = engines(scaled)
    assert any(rev in e["resident"] for e in after if e["id"] != victim["id"])

    # the sampler version moves too (from the control plane), and samples the same
    assert sampler.sample(prompt, num_samples=1, sampling_params=greedy).result().sequences[0].tokens == sampled
    # the run's live state died with its engine: its calls name the last checkpoint ...
    with pytest.raises(Exception, match=re.escape(path)):
        tc.forward_backward(BATCH, "cross_entropy").result()
    # ... and load_state resumes it on a live engine
    resumed = tinker.ServiceClient(base_url=scaled.url).create_training_client_from_state(path).result()
    loss = resumed.forward_backward(BATCH, "cross_entropy").result().metrics["loss:sum"]
    resumed.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    home = next(e for e in engines(scaled) if resumed.model_id in e["runs"])
    assert home["alive"] and loss > 0
    scaled.victim = victim


def test_ray_restarts_the_dead_engine_and_it_serves_again(scaled):
    deadline = time.time() + 600
    while True:
        e = next(e for e in engines(scaled) if e["id"] == scaled.victim["id"])
        if e["alive"]:
            break
        assert time.time() < deadline, "the engine was not restarted"
        time.sleep(1)
    assert e["pid"] != scaled.victim["pid"] and e["restarts"] == 1 and e["resident"] == [] and e["runs"] == []
    for rev in scaled.revs:  # every adapter still answers the same, wherever it lives now
        assert complete(scaled, f"local/s{scaled.revs.index(rev)}@{rev}") == scaled.texts[rev]
