"""Revoking a key or deleting a tenant locks it out of every API at once, on both catalog
backends: the operator runs `lorafleet keys revoke` / `tenants delete` (a separate process's
view of the same database) and the server's very next request with that key is a 401."""

from __future__ import annotations

import httpx
import pytest

from lorafleet.cli import main
from tests.catalog.backends import BACKENDS, database_url
from tests.e2e.conftest import TINY, start_server

# One authenticated GET on each API the server mounts.
ENDPOINTS = ("/api/v1/training_runs", "/v1/models", "/catalog/v1/policies")


@pytest.fixture(scope="module", params=BACKENDS)
def keyed(request, paths, tiny_pair, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"revoke-{request.param}")
    with database_url(request.param, tmp) as url:
        live = start_server(paths, [TINY], tmp, engines={TINY: tiny_pair}, database_url=url,
                            auth="keys", hold_s=5.0)
        live.db_url, live.store_url = url, str(tmp / "store")
        yield live
        live.stop()


@pytest.fixture
def operator(keyed, monkeypatch, capsys):
    """`lorafleet ...` as the operator runs it, on the server's catalog."""
    monkeypatch.setenv("LORAFLEET_DATABASE_URL", keyed.db_url)
    monkeypatch.setenv("LORAFLEET_STORE_URL", keyed.store_url)

    def run(*argv: str) -> str:
        code = main(list(argv))
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    return run


def _statuses(url: str, key: str) -> list[int]:
    codes = []
    with httpx.Client(base_url=url, timeout=30) as http:
        for path in ENDPOINTS:
            # the Tinker API takes X-API-Key; the OpenAI and catalog APIs take a Bearer token too
            headers = {"X-API-Key": key} if path.startswith("/api/") else {"Authorization": f"Bearer {key}"}
            codes.append(http.get(path, headers=headers).status_code)
    return codes


def test_revoked_key_is_refused_immediately(keyed, operator):
    catalog = keyed.app.state.catalog
    key, other = catalog.create_key("rita"), catalog.create_key("rita")
    assert _statuses(keyed.url, key) == [200, 200, 200]
    assert "revoked" in operator("keys", "revoke", key[:12])
    assert _statuses(keyed.url, key) == [401, 401, 401]
    assert _statuses(keyed.url, other) == [200, 200, 200]  # only that key


def test_deleted_tenants_keys_are_refused_immediately(keyed, operator):
    catalog = keyed.app.state.catalog
    keys = [catalog.create_key("tess"), catalog.create_key("tess")]
    bystander = catalog.create_key("uma")
    assert all(_statuses(keyed.url, k) == [200, 200, 200] for k in keys)
    assert "2 keys revoked" in operator("tenants", "delete", "tess")
    for k in keys:
        assert _statuses(keyed.url, k) == [401, 401, 401]
    assert _statuses(keyed.url, bystander) == [200, 200, 200]
