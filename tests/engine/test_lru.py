import pytest

from lorafleet.engine.lru import PinnedLRU


def test_lru_replay_with_pins_and_eviction_hook():
    evicted = []
    lru = PinnedLRU(max_entries=3, on_evict=lambda k, v: evicted.append(k))
    for k in "abc":
        lru.put(k, k.upper())
    assert lru.keys() == ["a", "b", "c"]
    lru.get("a")
    assert lru.keys() == ["b", "c", "a"]
    lru.pin("b")
    lru.put("d", "D")
    assert evicted == ["c"] and lru.keys() == ["b", "a", "d"]
    lru.put("e", "E", protected=["a"])
    assert evicted == ["c", "d"] and lru.keys() == ["b", "a", "e"]
    lru.pin("a"), lru.pin("e")
    assert not lru.can_admit()
    with pytest.raises(RuntimeError, match="pinned or in use"):
        lru.put("f", "F")
    lru.unpin("e")
    lru.put("f", "F")
    assert evicted[-1] == "e" and "f" in lru


def test_pins_count_and_byte_budget():
    lru = PinnedLRU(max_bytes=10, size=len)
    lru.put("a", "xxxx")
    lru.put("b", "xxxx")
    lru.pin("a"), lru.pin("a")
    lru.unpin("a")
    lru.put("c", "xxxx")  # 12 bytes > 10: evicts b, not the still-pinned a
    assert lru.keys() == ["a", "c"] and lru.nbytes == 8
    lru.unpin("a")
    lru.put("d", "xxxxxx")
    assert lru.keys() == ["c", "d"] or lru.keys() == ["d"]
    assert lru.nbytes <= 10
