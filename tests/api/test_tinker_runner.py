"""The engine thread: seq_id order per model, fusion across models, poisoned windows."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lorafleet.api.runner import FWDBWD, Op, Runner
from lorafleet.api.tinker import wire
from lorafleet.api.tinker.checkpoints import Checkpoints
from lorafleet.api.tinker.futures import FutureTable
from lorafleet.api.tinker.store import TinkerStore
from lorafleet.errors import BadTokens, InvalidRequest
from lorafleet.lora.spec import LoraSpec
from lorafleet.train.types import AdamParams, Datum, FwdBwdRequest, FwdBwdResult


class FakeEngine:
    """Records what the runner asks; fails forward_backward for token id 999."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.gate = threading.Event()
        self.gate.set()
        self.discarded: list[int] = []

    def create_adapter(self, spec, seed=None):
        self.handles = getattr(self, "handles", 100) + 1
        return self.handles

    def forward_backward(self, reqs):
        self.gate.wait()
        self.calls.append(("fb", [(r.adapter, int(r.data[0].tokens[0])) for r in reqs]))
        if any(int(d.tokens[0]) == 999 for r in reqs for d in r.data):
            raise BadTokens("token 999")
        return [FwdBwdResult([{"logprobs": torch.zeros(d.tokens.numel()),
                               "elementwise_loss": torch.ones(d.tokens.numel())} for d in r.data],
                             {"loss:sum": 1.0}) for r in reqs]

    def optim_step(self, h, hp):
        self.calls.append(("optim", h))
        return {}

    def discard_grads(self, h):
        self.discarded.append(h)


def call(model_id, seq, first_token=1):
    d = wire.WireDatum(np.array([first_token, 2, 3]), {"target_tokens": np.array([2, 3, 4]),
                                                        "weights": np.ones(3, np.float32)})
    return wire.FwdBwdCall(model_id, seq, "cross_entropy", {}, False, [d], f"fp{seq}")


@pytest.fixture()
def rig(tmp_path):
    store = TinkerStore(":memory:")
    futures = FutureTable(store)
    engine = FakeEngine()
    base = SimpleNamespace(name="fake", digest="d")
    types = SimpleNamespace(Datum=Datum, FwdBwdRequest=FwdBwdRequest, AdamParams=AdamParams)
    runner = Runner(engine, base, futures, store, Checkpoints(store, tmp_path), types=types,
                    gap_timeout_s=0.3)
    runner.start()
    yield runner, engine, futures
    runner.stop()


def submit(runner, futures, kind, model_id, seq, payload):
    rid, _ = futures.submit("t", kind, f"{model_id}{seq}{kind}", scope=model_id, seq_id=seq)
    runner.submit(Op(rid, kind, "t", payload, model_id=model_id, seq_id=seq))
    return rid


def create(runner, futures, model_id):
    rid, _ = futures.submit("t", "create_model", model_id)
    runner.submit(Op(rid, "create_model", "t", {"model_id": model_id, "spec": LoraSpec(rank=2),
                                                "lora_flags": {}}, model_id=model_id))
    wait_done(futures, rid)


def wait_done(futures, rid, timeout=5.0):
    t0 = time.time()
    while futures.state_of(rid) == "pending":
        assert time.time() - t0 < timeout, "future never finished"
        time.sleep(0.01)
    return futures.state_of(rid)


def test_ordered_per_model_and_fused_across_models(rig):
    runner, engine, futures = rig
    create(runner, futures, "a")
    create(runner, futures, "b")
    create(runner, futures, "c")
    engine.gate.clear()  # the engine thread blocks inside c's call while everything queues up
    blocker = submit(runner, futures, FWDBWD, "c", 1, call("c", 1, 31))
    time.sleep(0.1)
    ids = [blocker, submit(runner, futures, FWDBWD, "a", 3, call("a", 3, 13)),
           submit(runner, futures, FWDBWD, "a", 2, call("a", 2, 12)),
           submit(runner, futures, FWDBWD, "b", 1, call("b", 1, 21)),
           submit(runner, futures, "optim_step", "a", 4, {})]
    submit(runner, futures, FWDBWD, "a", 1, call("a", 1, 11))
    engine.gate.set()
    for rid in ids:
        assert wait_done(futures, rid) == "done"
    fb = [c for c in engine.calls if c[0] == "fb"]
    flat = [tok for _, reqs in fb for _, tok in reqs]
    assert [t for t in flat if t in (11, 12, 13)] == [11, 12, 13]  # a's chunks in seq order
    assert any(len({h for h, _ in reqs}) == 2 for _, reqs in fb)  # a and b fused in one call
    assert engine.calls[-1][0] == "optim"


def test_reused_seq_id_is_refused(rig):
    runner, _, futures = rig
    create(runner, futures, "a")
    rid = submit(runner, futures, FWDBWD, "a", 1, call("a", 1))
    wait_done(futures, rid)
    with pytest.raises(InvalidRequest, match="already used"):
        runner.submit(Op("x", FWDBWD, "t", call("a", 1), model_id="a", seq_id=1))


def test_failed_chunk_discards_grads_and_poisons_optim_step(rig):
    runner, engine, futures = rig
    create(runner, futures, "a")
    good = submit(runner, futures, FWDBWD, "a", 1, call("a", 1, 5))
    bad = submit(runner, futures, FWDBWD, "a", 2, call("a", 2, 999))
    opt = submit(runner, futures, "optim_step", "a", 3, {})
    assert wait_done(futures, good) == "done"
    assert wait_done(futures, bad) == "failed"
    assert wait_done(futures, opt) == "failed"
    assert engine.discarded  # partial gradients dropped
    assert ("optim", runner.models["a"].handle) not in engine.calls


def test_gap_is_skipped_after_timeout(rig):
    runner, _, futures = rig
    create(runner, futures, "a")
    rid = submit(runner, futures, FWDBWD, "a", 2, call("a", 2))  # seq 1 never comes
    assert futures.state_of(rid) == "pending"
    assert wait_done(futures, rid, timeout=3) == "done"
