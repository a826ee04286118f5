"""Soak and overload in CI: bench/soak.py for 20 s (3 tenants mixing Tinker training,
Tinker sampling bursts over their queue quota and OpenAI streams): no lost futures, no errors,
every 429 carries Retry-After, the server alive after. The 10-minute run is the benchmark."""

from __future__ import annotations

import os

import pytest

from bench.soak import run_soak

pytestmark = pytest.mark.slow


def test_soak_under_overload_loses_nothing():
    out = run_soak(float(os.environ.get("LORAFLEET_SOAK_S", "20")), max_queued=4)
    print(f"soak: {out}")
    assert out["lost"] == 0 and out["errors"] == 0, out
    assert out["429"] > 0 and out["429_without_retry_after"] == 0, out
    assert out["forward_backward_n"] > 0 and out["streams"] > 0 and out["asample_n"] > 0, out
    assert out["server_alive"]
