"""Every request limit of docs/operations.md ("Limits and quotas"), tried on a live server: each
is refused fast with the documented status and a message that names the limit. Quotas are in
tests/e2e/test_quotas.py."""

from __future__ import annotations

import json

import httpx
import pytest

from lorafleet.api.tinker.schemas import MAX_JSON_DEPTH
from tests.e2e.conftest import TINY, start_server

MAX_JSON = 64 << 10
MAX_BODY = 256 << 10


@pytest.fixture(scope="module")
def small(paths, tiny_pair, tmp_path_factory):
    live = start_server(paths, [TINY], tmp_path_factory.mktemp("limits"), engines={TINY: tiny_pair},
                        max_json_bytes=MAX_JSON, max_body_bytes=MAX_BODY)
    yield live
    live.stop()


def _deep(n: int) -> str:
    return '{"tags": ' + "[" * n + "]" * n + "}"


def _cases(context: int) -> list[tuple[str, str, str, object, int, str]]:
    tokens = {"chunks": [{"type": "encoded_text", "tokens": [1] * 8}]}
    return [
        ("json body size", "POST", "/catalog/v1/policies", "x" * (MAX_JSON + 1), 413, str(MAX_JSON)),
        ("tensor body size", "POST", "/api/v1/forward_backward", b"\0" * (MAX_BODY + 1), 413, str(MAX_BODY)),
        ("JSON depth", "POST", "/api/v1/create_session", _deep(MAX_JSON_DEPTH + 1), 400, str(MAX_JSON_DEPTH)),
        ("prompt + max_tokens vs context (/v1)", "POST", "/v1/completions",
         {"model": TINY, "prompt": [1] * 8, "max_tokens": context}, 400, str(context)),
        ("prompt + max_tokens vs context (Tinker)", "POST", "/api/v1/asample",
         {"base_model": TINY, "prompt": tokens, "sampling_params": {"max_tokens": context}}, 400, str(context)),
        ("n", "POST", "/v1/completions", {"model": TINY, "prompt": "hi", "n": 17}, 400, "16"),
        ("prompts per request", "POST", "/v1/completions",
         {"model": TINY, "prompt": ["hi"] * 65, "max_tokens": 1}, 400, "64"),
        ("num_samples", "POST", "/api/v1/asample",
         {"base_model": TINY, "prompt": tokens, "num_samples": 129, "sampling_params": {"max_tokens": 1}},
         400, "128"),
        ("bounded integer (seq_id)", "POST", "/api/v1/optim_step",
         {"model_id": "m", "seq_id": 1 << 63}, 400, "seq_id"),
        ("listing page", "GET", "/api/v1/training_runs?limit=10001", None, 400, "10000"),
        ("finite floats", "POST", "/api/v1/optim_step",
         '{"model_id": "m", "seq_id": 1, "adam_params": {"learning_rate": NaN}}', 400, "finite"),
        ("catalog cursor", "GET", "/catalog/v1/audit?cursor=99999999999999999999", None, 400, "cursor"),
    ]


def test_every_limit_is_refused_with_its_value(small):
    context = small.service.runners[TINY].base.info.max_context
    http = httpx.Client(base_url=small.url, timeout=30)
    tried, wrong = 0, []
    for what, method, path, body, status, mention in _cases(context):
        kwargs = {"json": body} if isinstance(body, dict) else {"content": body}
        r = http.request(method, path, **({} if body is None else kwargs))
        tried += 1
        text = r.text if r.status_code != 413 else json.dumps(r.json())
        if r.status_code != status or mention not in text:
            wrong.append(f"{what}: {r.status_code} {r.text[:200]}")
    assert not wrong, "\n".join(wrong)
    assert httpx.get(f"{small.url}/healthz").status_code == 200
    print(f"limits: {tried} cases refused as documented")
