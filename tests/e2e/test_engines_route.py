"""GET /admin/v1/engines (api/routes/engines.py) for the in-process engine: one record per base,
the same fields as for Ray engine actors (tests/e2e/test_scale_out.py covers those)."""

from __future__ import annotations

import os

import httpx
import tinker

from tests.e2e.conftest import TINY


def test_in_process_engine_record(server):
    tc = tinker.ServiceClient(base_url=server.url).create_lora_training_client(base_model=TINY, rank=4).result()
    (engine,) = httpx.get(f"{server.url}/admin/v1/engines").json()
    assert engine["id"] == f"{TINY}#local" and engine["base"] == TINY and engine["alive"] is True
    assert engine["pid"] == os.getpid() and engine["node"] and engine["restarts"] == 0
    assert engine["queue_depth"] == 0 and isinstance(engine["resident"], list)
    assert tc.model_id in engine["runs"]
