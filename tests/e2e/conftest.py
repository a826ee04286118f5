"""A real lorafleet server on loopback for the SDK tests: uvicorn in a thread, tiny base."""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TINKER_API_KEY", "tml-lorafleet-test")
os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = "lorafleet/tiny-llama"
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    app: object
    server: object
    thread: threading.Thread

    @property
    def service(self):
        return self.app.state.tinker

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(paths, bases: list[str], state_dir: Path, engines=None,
                 catalog_dir: Path | None = None, database_url: str | None = None,
                 startup_s: float = 30.0, **cfg) -> LiveServer:
    import uvicorn

    from lorafleet.api.app import ServeConfig, create_app

    from lorafleet.config import Paths

    torch.set_num_threads(1)
    # models are cached in the shared test home; catalog and store are per server (the
    # catalog database may be given instead, e.g. a PostgreSQL schema)
    shared = catalog_dir or state_dir
    own = Paths(home=paths.home, database_url=database_url or f"sqlite:///{shared / 'catalog.db'}",
                store_url=str(shared / "store"))
    config = ServeConfig(bases=bases, paths=own, state_dir=state_dir, engines=engines or {},
                         **cfg)
    app = create_app(config)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + startup_s
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", app, server, thread)


@pytest.fixture(scope="session")
def tiny_pair(paths):
    """One tiny-llama base + engine shared by the e2e tests (each test makes its own runs)."""
    from lorafleet.engine import Engine
    from lorafleet.model import load_base

    base = load_base(TINY, paths)
    return base, Engine(base)


@pytest.fixture(scope="module")
def server(paths, tiny_pair, tmp_path_factory):
    live = start_server(paths, [TINY], tmp_path_factory.mktemp("tinker"),
                        engines={TINY: tiny_pair}, hold_s=5.0, gap_timeout_s=5.0)
    yield live
    live.stop()


@pytest.fixture()
def service_client(server):
    import tinker

    client = tinker.ServiceClient(base_url=server.url)
    yield client
