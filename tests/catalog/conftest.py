from __future__ import annotations

import json

import pytest

from lorafleet.catalog import ADMIN, Catalog
from lorafleet.lora.spec import LoraSpec
from tests.catalog.backends import BACKENDS, database_url

BASE = "lorafleet/tiny-llama"
SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path):
    with database_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def store_dir(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture
def catalog(db_url, store_dir):
    cat = Catalog.open(db_url, store_dir)
    yield cat
    cat.close()


def adapter_files(weights: bytes, spec: LoraSpec = SPEC, base: str = BASE) -> dict[str, bytes]:
    """Revision files as the catalog sees them: a PEFT config and opaque weight bytes."""
    return {
        "adapter_config.json": json.dumps(spec.to_peft_config(base)).encode(),
        "adapter_model.safetensors": weights,
    }


@pytest.fixture
def policy(catalog):
    return catalog.create_policy(ADMIN, "alice/chat", BASE, SPEC)
