"""The engine thread: seq_id order per model, fusion across models, poisoned windows."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from lorafleet.api.runner import FWDBWD, Op, Runner
from lorafleet.api.tinker import wire
from lorafleet.api.tinker.checkpoints import Checkpoints
from lorafleet.api.tinker.futures import FutureTable
from lorafleet.api.tinker.store import TinkerStore
from lorafleet.engine import Engine
from lorafleet.errors import InvalidRequest
from lorafleet.lora.spec import LoraSpec
from lorafleet.model import load_base


class RecordingEngine(Engine):
    """The real engine on tiny-llama, recording what the runner asks and able to pause."""

    def __init__(self, base):
        super().__init__(base)
        self.calls: list[tuple] = []
        self.gate = threading.Event()
        self.gate.set()
        self.discarded: list[int] = []

    def forward_backward(self, reqs):
        self.gate.wait()
        self.calls.append(("fb", [(r.adapter, int(r.data[0].tokens[0])) for r in reqs]))
        return super().forward_backward(reqs)

    def optim_step(self, h, hp):
        self.calls.append(("optim", h))
        return super().optim_step(h, hp)

    def discard_grads(self, h):
        self.discarded.append(h)
        super().discard_grads(h)


OUT_OF_VOCAB = 10**6


def call(model_id, seq, first_token=1):
    d = wire.WireDatum(np.array([first_token, 2, 3]), {"target_tokens": np.array([2, 3, 4]),
                                                        "weights": np.ones(3, np.float32)})
    return wire.FwdBwdCall(model_id, seq, "cross_entropy", {}, False, [d], f"fp{seq}")


@pytest.fixture()
def rig(tmp_path, paths):
    store = TinkerStore(":memory:")
    futures = FutureTable(store)
    base = load_base("lorafleet/tiny-llama", paths)
    engine = RecordingEngine(base)
    runner = Runner(engine, base, futures, store, Checkpoints(store, tmp_path), gap_timeout_s=0.3)
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
    bad = submit(runner, futures, FWDBWD, "a", 2, call("a", 2, OUT_OF_VOCAB))
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


def test_a_bad_request_in_a_fused_batch_leaves_other_runs_gradients_alone(rig):
    runner, engine, futures = rig
    create(runner, futures, "a")
    create(runner, futures, "b")
    first = submit(runner, futures, FWDBWD, "a", 1, call("a", 1, 5))
    assert wait_done(futures, first) == "done"
    engine.gate.clear()
    blocker = submit(runner, futures, FWDBWD, "a", 2, call("a", 2, 6))
    time.sleep(0.1)
    fused = [submit(runner, futures, FWDBWD, "a", 3, call("a", 3, 7)),
             submit(runner, futures, FWDBWD, "b", 1, call("b", 1, OUT_OF_VOCAB))]
    engine.gate.set()
    assert wait_done(futures, blocker) == "done"
    assert [wait_done(futures, rid) for rid in fused] == ["done", "failed"]
    a = runner.models["a"].handle
    assert a not in engine.discarded and engine.has_grads(a)
    assert wait_done(futures, submit(runner, futures, "optim_step", "a", 4, {})) == "done"


def test_fused_batches_are_capped_by_logit_memory(tmp_path, paths):
    base = load_base("lorafleet/tiny-llama", paths)
    runner = Runner(RecordingEngine(base), base, FutureTable(TinkerStore(":memory:")),
                    TinkerStore(":memory:"), Checkpoints(TinkerStore(":memory:"), tmp_path),
                    max_fused_logit_bytes=4 * base.info.vocab_size * 4 * 3)
    assert runner.max_fused_tokens == 4  # two 3-token chunks no longer fit one batch
