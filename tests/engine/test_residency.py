"""Residency tiers and the cold loader on the tiny model, with a real store-like fetch."""

import threading
import time

import pytest
import torch

from lorafleet.engine import SampleRequest, SamplingParams
from lorafleet.engine.residency import NotResident, Residency, Tier
from lorafleet.errors import NoCapacity
from lorafleet.lora.io import parse_peft_files, peft_files
from lorafleet.lora.spec import LoraSpec
from tests.helpers import DEVICES, random_adapter

PROMPT = [1, 504, 2823, 314]
GREEDY = SamplingParams(max_tokens=6, temperature=0, stop_token_ids=())


class BlobFetch:
    """Revisions stored as PEFT bytes (as the store keeps them); counts batches and keys."""

    def __init__(self, info, n, delay_s=0.0):
        self.files = {f"rev{i}": peft_files(random_adapter(info, LoraSpec(rank=2, alpha=32), seed=i, b_scale=0.5), info.name) for i in range(n)}
        self.delay_s = delay_s
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, keys):
        self.gate.wait(10)
        self.calls.append(list(keys))
        time.sleep(self.delay_s)
        return {k: parse_peft_files(self.files[k]).weights if k in self.files else KeyError(k) for k in keys}


def _sample(res, key):
    """Greedy tokens of the adapter in `key`'s slot (read back from the slot buffers)."""
    slot = res.activate([key])[key]
    w = res.table.read(slot)
    handle = res.engine.create_adapter(w.spec, weights=w)
    (out,) = res.engine.sample([SampleRequest(handle, PROMPT, 1, GREEDY)])
    res.engine.remove_adapter(handle)
    return out.sequences[0].tokens


def test_tiers_replay(tiny_engine):
    fetch = BlobFetch(tiny_engine.info, 6)
    res = Residency(tiny_engine, fetch, max_slots=2, max_host_adapters=3)
    assert res.tier("rev0") is Tier.STORE
    with pytest.raises(NotResident):
        res.activate(["rev0"])
    for k in ("rev0", "rev1", "rev2"):
        res.ensure_host(k).result(10)
    assert res.counts() == {"slot": 0, "host": 3}
    res.activate(["rev0", "rev1"])
    assert (res.tier("rev0"), res.tier("rev1"), res.tier("rev2")) == (Tier.SLOT, Tier.SLOT, Tier.HOST)
    res.activate(["rev2"])  # evicts rev0 (LRU) from the slots
    assert res.tier("rev0") is Tier.HOST and res.counts()["slot"] == 2
    with pytest.raises(NoCapacity):
        res.activate(["rev0", "rev1", "rev2"])  # three distinct adapters, two slots
    res.ensure_host("rev3").result(10)  # host holds 3: evicts the LRU host entry
    assert res.counts()["host"] == 3


def test_evicted_adapter_reloads_bit_identical(tiny_engine):
    fetch = BlobFetch(tiny_engine.info, 4)
    res = Residency(tiny_engine, fetch, max_slots=1, max_host_adapters=1)
    res.ensure_host("rev0").result(10)
    first = _sample(res, "rev0")
    base = tiny_engine.sample([SampleRequest(None, PROMPT, 1, GREEDY)])[0].sequences[0].tokens
    assert first != base
    for k in ("rev1", "rev2"):
        res.ensure_host(k).result(10)
        _sample(res, k)
    assert res.tier("rev0") is Tier.STORE
    res.ensure_host("rev0").result(10)
    assert _sample(res, "rev0") == first
    w_before = parse_peft_files(fetch.files["rev0"]).weights
    slot = res.activate(["rev0"])["rev0"]
    for p, (a, b) in res.table.read(slot).pairs.items():
        assert torch.equal(a, w_before.pairs[p][0])
        torch.testing.assert_close(b, w_before.pairs[p][1])  # stored scaled, read back unscaled


def test_identical_misses_share_one_load_and_distinct_misses_batch(tiny_engine):
    fetch = BlobFetch(tiny_engine.info, 6)
    fetch.gate.clear()  # hold the loader until all misses are queued
    res = Residency(tiny_engine, fetch, max_slots=4, max_host_adapters=8, load_batch=8)
    futures = [res.ensure_host("rev1") for _ in range(20)]
    futures += [res.ensure_host(k) for k in ("rev2", "rev3")]
    assert len({id(f) for f in futures[:20]}) == 1
    fetch.gate.set()
    for f in futures:
        f.result(10)
    keys_loaded = [k for call in fetch.calls for k in call]
    assert sorted(keys_loaded) == ["rev1", "rev2", "rev3"]
    assert len(fetch.calls) <= 2  # the first call may have taken rev1 alone
    assert res.metrics.loads._value.get() == 3


def test_full_queue_answers_no_capacity_and_recovers(tiny_engine):
    fetch = BlobFetch(tiny_engine.info, 6)
    fetch.gate.clear()
    res = Residency(tiny_engine, fetch, max_slots=2, max_host_adapters=4, max_queue=2)
    a, b = res.ensure_host("rev0"), res.ensure_host("rev1")
    with pytest.raises(NoCapacity, match="queue is full") as info:
        res.ensure_host("rev2")
    assert info.value.retry_after_s > 0
    fetch.gate.set()
    a.result(10), b.result(10)
    res.ensure_host("rev2").result(10)


def test_failed_load_reports_and_is_retryable(tiny_engine):
    fetch = BlobFetch(tiny_engine.info, 1)
    res = Residency(tiny_engine, fetch, max_slots=1, max_host_adapters=2)
    with pytest.raises(KeyError):
        res.ensure_host("missing").result(10)
    assert res.tier("missing") is Tier.STORE and res.loader.depth == 0


def test_pinned_adapters_stay(tiny_engine):
    fetch = BlobFetch(tiny_engine.info, 5)
    res = Residency(tiny_engine, fetch, max_slots=2, max_host_adapters=2)
    res.pin("rev0")  # before it is loaded: applies on arrival
    res.ensure_host("rev0").result(10)
    res.activate(["rev0"])
    for k in ("rev1", "rev2", "rev3"):
        res.ensure_host(k).result(10)
        res.activate([k])
    assert res.tier("rev0") is Tier.SLOT
    res.unpin("rev0")
    res.ensure_host("rev4").result(10)
    res.activate(["rev4"])  # rev0 is now the least recently used slot and unpinned
    assert res.tier("rev0") is not Tier.SLOT and res.tier("rev4") is Tier.SLOT


def test_holds_keep_host_weights_and_pins_keep_slots(tiny_engine):
    fetch = BlobFetch(tiny_engine.info, 6)
    res = Residency(tiny_engine, fetch, max_slots=2, max_host_adapters=2)
    res.hold("rev0")  # before the load: applies on arrival
    res.ensure_host("rev0").result(10)
    res.ensure_host("rev1").result(10)
    res.ensure_host("rev2").result(10)  # evicts rev1, never the held rev0
    assert res.tier("rev0") is Tier.HOST and res.tier("rev1") is Tier.STORE
    res.hold("rev2")
    with pytest.raises(NoCapacity):  # host full of held adapters: a retryable refusal
        res.ensure_host("rev3").result(10)
    res.release("rev0")
    res.release("rev2")
    res.ensure_host("rev3").result(10)
    # a hold never pins a slot; a pin does, and is counted
    res.pin("rev3")
    res.pin("rev3")
    res.activate(["rev3"])
    assert res.is_pinned("rev3") and res.free_slots_for_batch() == 1
    res.ensure_host("rev4").result(10)
    res.activate(["rev4"])
    res.ensure_host("rev5").result(10)
    res.activate(["rev5"])  # evicts rev4, never the pinned rev3
    assert res.tier("rev3") is Tier.SLOT and res.tier("rev4") is not Tier.SLOT
    res.unpin("rev3")
    assert res.is_pinned("rev3")
    res.unpin("rev3")
    assert not res.is_pinned("rev3") and res.free_slots_for_batch() == 2
    res.close()


@pytest.mark.parametrize("device", DEVICES)
def test_slot_operands_equal_the_stacked_reference(tiny_engine, device):
    """Rows gather their operands from the preallocated slot buffers; the numbers equal the
    pure per-batch stacking (`row_operands`), mixed ranks and targets, slot 0 = the base."""
    from lorafleet.engine.batch import row_operands
    from lorafleet.engine.slots import SlotTable

    specs = [LoraSpec(rank=2, alpha=32), LoraSpec(rank=8, alpha=16, target_modules=("q_proj", "up_proj"))]
    ws = [random_adapter(tiny_engine.info, s, seed=i, b_scale=0.5) for i, s in enumerate(specs)]
    table = SlotTable(4, torch.float32, device)
    table.load(3, ws[0])
    table.load(1, ws[1])
    got = table.operands(torch.tensor([3, 0, 1, 3]))
    want = row_operands([ws[0], None, ws[1]], torch.tensor([0, 1, 2, 0]), torch.float32)
    assert set(got) == set(want)
    for path, (a, b) in want.items():
        ga, gb = got[path]
        r = a.shape[-1]  # the buffers may be wider (zero columns add nothing)
        torch.testing.assert_close(ga[..., :r].cpu(), a, rtol=0, atol=0)
        torch.testing.assert_close(gb[:, :r].cpu(), b, rtol=0, atol=0)
        assert not ga[..., r:].any() and not gb[:, r:].any()
    table.load(3, ws[1])  # a reload replaces the slot, stale modules are cleared
    assert set(table.operands(torch.tensor([3]))) == {p for p in ws[1].pairs}


def test_evict_drops_what_nothing_holds(tiny_engine):
    fetch = BlobFetch(tiny_engine.info, 3)
    res = Residency(tiny_engine, fetch, max_slots=2, max_host_adapters=3)
    before = None
    for k in ("rev0", "rev1"):
        res.ensure_host(k).result(10)
    before = _sample(res, "rev0")
    res.activate(["rev1"])
    res.pin("rev1")
    lease = res.acquire("rev0")  # a request admitted on rev0: held
    assert res.evict("rev0") == [] and res.evict("rev1") == []  # in use, pinned: stay
    lease.release()
    res.unpin("rev1")
    assert res.evict("rev0") == [Tier.SLOT, Tier.HOST] and res.tier("rev0") is Tier.STORE
    assert res.evict("rev1") == [Tier.SLOT, Tier.HOST] and res.counts() == {"slot": 0, "host": 0}
    assert res.evict("rev2") == []
    res.ensure_host("rev0").result(10)  # reloaded from the store: the same outputs
    assert _sample(res, "rev0") == before
    res.close()
