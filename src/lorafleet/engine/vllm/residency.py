"""Residency driving vLLM: lorafleet's slot tier is the set of adapters registered in vLLM.

The tiers and their protocol stay lorafleet's (engine/residency.py): the host tier holds
LoraWeights in lorafleet's memory, misses go through the same bounded, coalescing cold loader
(a full queue is still a 429), holds and pins are counted the same way. What changes is what a
slot is: activating a key writes its weights as a PEFT folder (engine/vllm/folders.py) and
registers it with vLLM's `POST /v1/load_lora_adapter`; evicting a slot (LRU, never a pinned
one) calls `POST /v1/unload_lora_adapter` and removes the folder. vLLM is started with
`--max-cpu-loras` = lorafleet's slot count, so vLLM never drops an adapter lorafleet thinks is
registered; `--max-loras` (adapters one vLLM batch mixes) is vLLM's own business.

Activations are serialized by one lock, so two identical misses make one load (the second
finds the slot the first made). When vLLM restarts, `reregister` loads every slot again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Iterable
from typing import Any

from lorafleet.engine.residency import NotResident, Residency, Tier
from lorafleet.engine.vllm.client import VllmClient
from lorafleet.engine.vllm.folders import AdapterFolders
from lorafleet.errors import IncompatibleAdapter, NoCapacity

log = logging.getLogger(__name__)


class VllmResidency(Residency):
    """`Residency` whose slot tier is vLLM's set of loaded LoRA adapters."""

    def __init__(self, engine: Any, fetch_many: Any, *, client: VllmClient, folders: AdapterFolders,
                 max_rank: int = 512, **kwargs: Any) -> None:
        super().__init__(engine, fetch_many, **kwargs)
        self.max_rank = max_rank  # vLLM's --max-lora-rank
        self.client = client
        self.folders = folders
        self._activating = threading.Lock()  # one activation at a time: misses coalesce
        self._evicted: list[Hashable] = []  # slots dropped by the LRU, to unload from vLLM

    def lora_name(self, key: Hashable) -> str:
        return self.folders.name(key)

    def activate(self, keys: Iterable[Hashable]) -> dict[Hashable, int]:
        """Register `keys` with vLLM (all must be host- or slot-resident); their slot handles."""
        return self._activate(list(dict.fromkeys(keys)), pin=False)

    def activate_pinned(self, key: Hashable) -> int:
        """Activate `key` and pin its slot in one step (a lease taking its slot)."""
        return self._activate([key], pin=True)[key]

    def _activate(self, wanted: list[Hashable], pin: bool) -> dict[Hashable, int]:
        handles: dict[Hashable, int] = {}
        with self._activating:
            todo = []
            with self._lock:
                for key in wanted:
                    handle = self._slots.get(key)
                    if handle is not None:
                        self.metrics.tier_hits.labels(Tier.SLOT).inc()
                        handles[key] = handle
                        continue
                    self.metrics.tier_misses.labels(Tier.SLOT).inc()
                    weights = self._host.get(key)
                    if weights is None:
                        raise NotResident(f"{key!r} is not in host memory; call ensure_host first")
                    if weights.spec.rank > self.max_rank:
                        raise IncompatibleAdapter(f"rank {weights.spec.rank} is above the vLLM sampler's "
                                                  f"--vllm-max-lora-rank {self.max_rank}")
                    if not self._slots.can_admit(protected=wanted):
                        raise NoCapacity(f"all {self._slots.max_entries} vLLM adapter slots are pinned or in use")
                    self._slots.put(key, 0, protected=wanted)  # evicts the LRU slot if all are taken
                    handle = self._free.pop()
                    self._slots.put(key, handle, protected=wanted)
                    todo.append((key, weights.checked(self.engine.info)))
                    handles[key] = handle
                if pin:
                    for key in wanted:
                        self._slots.pin(key)
                evicted, self._evicted = self._evicted, []
            for key in evicted:
                self._unload(key)
            for i, (key, weights) in enumerate(todo):
                try:
                    folder = self.folders.write(key, weights)
                    self.client.load_adapter(self.lora_name(key), folder)
                except BaseException:
                    with self._lock:  # nothing of this activation stays half-registered
                        for k, _ in todo[i:]:
                            if pin and k in self._slots:
                                self._slots.unpin(k)
                            self._slots.pop(k)
                            self._free.append(handles[k])
                    raise
                with self._lock:
                    if key in self._user_pins:
                        self._slots.pin(key)
            with self._lock:
                self._publish_counts()
        return handles

    def add_host(self, key: Hashable, weights: Any) -> None:
        """Host tier, then straight into vLLM when a slot is free: a sampler version saved by
        the trainer is live in vLLM before its future completes (adapter-only handoff)."""
        super().add_host(key, weights)
        if self.can_activate(key):
            try:
                self.activate([key])
            except (NoCapacity, IncompatibleAdapter) as e:  # all slots pinned, vLLM restarting, too wide
                log.warning("%r is not registered in vLLM yet (%s); the first request for it tries again", key, e)

    def reregister(self) -> None:
        """vLLM restarted and lost its adapters: register every slot again from its folder."""
        with self._activating:
            with self._lock:
                keys = list(self._slots.keys())
            for key in keys:
                try:
                    self.client.load_adapter(self.lora_name(key), self.folders.path(key))
                except Exception:
                    log.exception("re-registering %r with vLLM failed; dropping its slot", key)
                    with self._lock:
                        if not self._slots.is_pinned(key):
                            self._slots.pop(key)

    def _evict_slot(self, key: Hashable, slot: int) -> None:
        super()._evict_slot(key, slot)
        self._evicted.append(key)  # unloaded by the activation that evicted it, outside the lock

    def _unload(self, key: Hashable) -> None:
        try:
            self.client.unload_adapter(self.lora_name(key))
        except Exception:
            log.warning("unloading %r from vLLM failed (it may have restarted)", key, exc_info=True)
        self.folders.remove(key)


__all__ = ["VllmResidency"]
