"""Publishing engine weights (LoraWeights) as PEFT files, and reading them back."""

from __future__ import annotations

import torch

from lorafleet.catalog import ADMIN
from lorafleet.catalog.service import OPTIMIZER_FILE
from lorafleet.errors import IncompatibleAdapter
from lorafleet.lora.io import parse_peft_files
from lorafleet.lora.weights import LoraWeights
from lorafleet.model.registry import base_info
from tests.catalog.conftest import BASE, SPEC

import pytest


def test_publish_weights_round_trip(catalog, policy):
    weights = LoraWeights.init(base_info(BASE), SPEC, seed=3)
    rev = catalog.publish_weights(ADMIN, "alice/chat", weights, step=7, kind="state",
                                  optimizer_state=b"adam-moments", aliases=["latest-train"])
    files = catalog.read_files(ADMIN, "alice/chat:latest-train")
    assert files[OPTIMIZER_FILE] == b"adam-moments" and rev.step == 7
    back = parse_peft_files(files)
    assert back.spec == SPEC and back.base_model == BASE
    for path, (a, b) in weights.pairs.items():
        assert torch.equal(back.weights.pairs[path][0], a) and torch.equal(back.weights.pairs[path][1], b)
    again = catalog.publish_weights(ADMIN, "alice/chat", weights)
    assert catalog.manifest(ADMIN, again.id).as_dict()["adapter_model.safetensors"] == \
        catalog.manifest(ADMIN, rev.id).as_dict()["adapter_model.safetensors"]  # canonical bytes


def test_publish_weights_that_do_not_fit_the_base(catalog, policy):
    weights = LoraWeights.init(base_info("HuggingFaceTB/SmolLM2-135M-Instruct"), SPEC, seed=0)
    with pytest.raises(IncompatibleAdapter):
        catalog.publish_weights(ADMIN, "alice/chat", weights)
