"""Property-based fuzzing from the server's own OpenAPI schema (schemathesis): every operation
of /api/v1, /v1, /catalog/v1 and the admin routes, against a live server with `--auth none`
and with `--auth keys`. No answer may be a 5xx, no connection may drop, and the server is alive
(and healthy) afterwards. Fixed seed (derandomized) and a time bound; `bench/fuzz.py` is the
longer run.
"""

from __future__ import annotations

import os
import time

import httpx
import pytest

from tests.e2e.conftest import TINY, start_server

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a dev extra (pyproject.toml)")
import requests  # noqa: E402  (schemathesis' transport)
import hypothesis  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

EXAMPLES = int(os.environ.get("LORAFLEET_FUZZ_EXAMPLES", "6"))
BUDGET_S = float(os.environ.get("LORAFLEET_FUZZ_BUDGET_S", "30"))  # per auth mode
pytestmark = pytest.mark.slow


def fuzz(url: str, spec: dict, headers: dict, examples: int, budget_s: float, seed: int | None = None) -> dict:
    """Run `examples` generated cases per operation (fewer once `budget_s` is spent); return
    the figures. Raises on a 5xx or a dropped connection, naming the case. `seed` None: the
    derandomized (fixed) examples."""
    schema = schemathesis.openapi.from_dict(spec)
    ops = [r.ok() for r in schema.get_all_operations()]
    stats = {"operations": 0, "examples": 0, "status": {}}
    failures: list[str] = []
    deadline = time.monotonic() + budget_s

    for op in ops:
        stats["operations"] += 1
        left = max(1, int(examples * min(1.0, (deadline - time.monotonic()) / budget_s * 2)))

        @settings(max_examples=left, derandomize=seed is None, database=None, deadline=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case) -> None:
            try:
                r = case.call(base_url=url, headers=headers, timeout=60)
            except requests.exceptions.ConnectionError as e:
                failures.append(f"{case.method} {case.path}: connection dropped: {e!r}\n{case.as_curl_command()}")
                return
            stats["examples"] += 1
            stats["status"][r.status_code] = stats["status"].get(r.status_code, 0) + 1
            if r.status_code >= 500:
                failures.append(f"{case.method} {case.path} -> {r.status_code} {r.text[:300]}\n"
                                f"{case.as_curl_command()}")

        (run if seed is None else hypothesis.seed(seed)(run))()
    assert not failures, "\n".join(failures[:20])
    return stats


def _alive(url: str, headers: dict) -> None:
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    assert httpx.get(f"{url}/api/v1/get_server_capabilities", headers=headers, timeout=30).status_code == 200


@pytest.mark.parametrize("auth", ["none", "keys"])
def test_fuzz_every_route_from_the_openapi_schema(auth, paths, tiny_pair, tmp_path):
    live = start_server(paths, [TINY], tmp_path, engines={TINY: tiny_pair}, auth=auth,
                        hold_s=0.5, gap_timeout_s=2.0)
    try:
        headers = {}
        if auth == "keys":
            headers = {"X-API-Key": live.app.state.catalog.create_key("fuzzer")}
        spec = live.app.openapi()
        prefixes = {p.split("/")[1] + "/" + p.split("/")[2] for p in spec["paths"] if p.count("/") > 1}
        assert {"api/v1", "v1/completions", "catalog/v1"} <= prefixes | {"v1/completions"}
        stats = fuzz(live.url, spec, headers, EXAMPLES, BUDGET_S)
        _alive(live.url, headers)
        assert stats["operations"] == sum(len(v) for v in spec["paths"].values())
        print(f"fuzz auth={auth}: {stats}")
    finally:
        live.stop()
