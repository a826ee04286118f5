"""Shared fixtures: one lorafleet home for cached base models, engines on the tiny bases."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lorafleet.config import Paths, paths_from_env

REPO = Path(__file__).resolve().parents[1]
# Converted base models are cached across runs here (gitignored); catalogs and stores of
# individual tests live in tmp_path.
TEST_HOME = Path(os.environ.get("LORAFLEET_TEST_HOME", REPO / ".lorafleet-test"))

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def paths() -> Paths:
    return paths_from_env({"LORAFLEET_HOME": str(TEST_HOME)})


@pytest.fixture(scope="session")
def tiny_base(paths):
    from lorafleet.model import load_base

    return load_base("lorafleet/tiny-llama", paths)


@pytest.fixture(scope="session")
def smol_base(paths):
    from lorafleet.model import load_base

    return load_base("HuggingFaceTB/SmolLM2-135M-Instruct", paths)


@pytest.fixture()
def tiny_engine(paths):
    """A fresh engine on its own tiny-llama instance (the model object is injected in place)."""
    from lorafleet.engine import Engine
    from lorafleet.model import load_base

    return Engine(load_base("lorafleet/tiny-llama", paths))


@pytest.fixture(scope="session")
def smol_engine(smol_base):
    """One SmolLM2 engine for the session (tests add their own adapters to it)."""
    from lorafleet.engine import Engine

    return Engine(smol_base)
