"""A catalog (database + store) per test, on each backend: where the Tinker state lives."""

from __future__ import annotations

import pytest

from lorafleet.catalog import Catalog
from tests.catalog.backends import BACKENDS, database_url


@pytest.fixture(params=BACKENDS)
def catalog(request, tmp_path):
    with database_url(request.param, tmp_path) as url:
        cat = Catalog.open(url, str(tmp_path / "store"))
        yield cat
        cat.close()
