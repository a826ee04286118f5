"""Residency: where each adapter revision's tensors are, and the only code that moves them.

Three tiers, from fastest to largest:
  slot  - copied into a slot of the preallocated `SlotTable` (engine/slots.py) that sampling
          rows index, at most `max_slots`, LRU with pinning;
  host  - LoraWeights in CPU memory, at most `max_host_adapters` / `max_host_bytes`, LRU;
  store - the durable blob store behind `fetch_many` (the catalog), unbounded.

A slot hit runs at once; a host hit is copied into a slot by the engine thread (cheap); a
miss is queued on the ColdLoader and the request waits without blocking resident work.
Keys are immutable revision ids, so the same key always means the same bytes, and an evicted
adapter reloaded later gives bit-identical outputs.

Admission is one protocol, acquire -> lease -> release: the service calls `acquire(key)`
when it admits a request (a counted host hold taken *before* the load is asked for, so a
loaded adapter can never be evicted before its job runs); the scheduler calls
`lease.activate()` when the job's rows join the batch (a slot, pinned while the rows run) and
`lease.release()` when the job ends (slot pin and host hold dropped, exactly once).

Threading: `activate` and `Lease.activate` run on the engine thread only; everything else is
safe from any thread (the tiers share one lock).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future
from enum import StrEnum

from lorafleet.engine.engine import Engine
from lorafleet.engine.loader import ColdLoader, FetchMany
from lorafleet.engine.lru import PinnedLRU
from lorafleet.engine.slots import SlotTable
from lorafleet.errors import InvalidRequest, NoCapacity
from lorafleet.lora.weights import LoraWeights
from lorafleet.metrics import Metrics

log = logging.getLogger(__name__)


class Tier(StrEnum):
    SLOT = "slot"
    HOST = "host"
    STORE = "store"


class NotResident(LookupError):
    """`activate` was asked for a key that is not in host memory yet (an engine-thread bug)."""


class Lease:
    """One job's hold on an adapter version, from admission to the end of the job.

    `loaded` resolves once the weights are in host memory. Released exactly once.
    """

    def __init__(self, residency: Residency, key: Hashable, loaded: Future) -> None:
        self.residency = residency
        self.key = key
        self.loaded = loaded
        self._slot = False
        self._released = False

    def activate(self) -> int:
        """Engine thread: the adapter's slot index, pinned until `release`."""
        handle = self.residency.activate([self.key])[self.key]
        if not self._slot:
            with self.residency._lock:
                self.residency._slots.pin(self.key)
            self._slot = True
        return handle

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        with self.residency._lock:
            if self._slot and self.key in self.residency._slots:
                self.residency._slots.unpin(self.key)
        self.residency.release(self.key)


class Residency:
    """Slots, host cache and cold loader for one engine.

    Args:
        engine: the engine whose adapters are the slot tier.
        fetch_many: loads revisions from the store: keys -> {key: LoraWeights | Exception}.
        max_slots: live adapters in the engine (vLLM's `max_loras`).
        max_host_adapters / max_host_bytes: host cache capacity (vLLM's `max_cpu_loras`).
    """

    def __init__(
        self,
        engine: Engine,
        fetch_many: FetchMany,
        *,
        max_slots: int = 64,
        max_host_adapters: int | None = 512,
        max_host_bytes: int | None = None,
        max_queue: int = 64,
        load_batch: int = 8,
        load_workers: int = 1,
        metrics: Metrics | None = None,
    ) -> None:
        if max_host_adapters is not None and max_host_adapters < max_slots:
            raise InvalidRequest(f"max_host_adapters ({max_host_adapters}) must be >= max_slots ({max_slots})")
        self.engine = engine
        self.metrics = metrics or Metrics()
        self._lock = threading.RLock()
        device = next(engine.base.model.parameters()).device
        self.table = SlotTable(max_slots, engine.base.dtype, device)
        self._free = list(range(max_slots, 0, -1))  # slot indices not in use
        self._slots: PinnedLRU[Hashable, int] = PinnedLRU(max_entries=max_slots, on_evict=self._evict_slot)
        self._host: PinnedLRU[Hashable, LoraWeights] = PinnedLRU(
            max_entries=max_host_adapters, max_bytes=max_host_bytes, size=lambda w: w.nbytes,
            on_evict=lambda k, _: self._count_evict(Tier.HOST),
        )
        self._pending_pins: dict[Hashable, int] = {}  # host holds of keys not loaded yet
        self._user_pins: dict[Hashable, int] = {}  # pin() counts (host + slot)
        self.loader = ColdLoader(fetch_many, self._admit_host, max_queue=max_queue,
                                 batch_size=load_batch, workers=load_workers, metrics=self.metrics)

    # ---- any thread -----------------------------------------------------------------------

    def tier(self, key: Hashable) -> Tier:
        with self._lock:
            if key in self._slots:
                return Tier.SLOT
            return Tier.HOST if key in self._host else Tier.STORE

    def ensure_host(self, key: Hashable) -> Future:
        """A future that resolves once `key` is in host memory (at once on a hit).

        Raises NoCapacity when the cold-load queue is full.
        """
        with self._lock:
            # host only: a key held in a slot but not in host memory is reloaded, since the hold
            # (see `hold`) pins host entries and a slot alone may be evicted before the job runs
            hit = key in self._host
            if hit:
                self._host.get(key)
        if hit:
            self.metrics.tier_hits.labels(Tier.HOST).inc()
            done: Future = Future()
            done.set_result(None)
            return done
        self.metrics.tier_misses.labels(Tier.HOST).inc()
        return self.loader.request(key)

    def acquire(self, key: Hashable, load: Callable[[], LoraWeights] | None = None) -> Lease:
        """Admit a request for `key`: hold it in host memory until the lease is released.

        The hold comes first, so the weights cannot be evicted between their load and the job.
        A miss is loaded by `load()` (called here, e.g. a Tinker checkpoint read) or else by
        the cold loader (`lease.loaded` resolves when it lands; NoCapacity when its queue is
        full).
        """
        self.hold(key)
        try:
            if load is not None and not self.has_host(key):
                self.add_host(key, load())
            loaded = self.ensure_host(key)
        except BaseException:
            self.release(key)
            raise
        return Lease(self, key, loaded)

    def can_activate(self, key: Hashable) -> bool:
        """Whether `key` has a slot or one can be made now (without evicting pinned slots)."""
        with self._lock:
            return key in self._slots or self._slots.can_admit()

    def add_host(self, key: Hashable, weights: LoraWeights) -> None:
        """Put weights the caller already has (e.g. fresh from training) into the host tier."""
        self._admit_host(key, weights)

    def pin(self, key: Hashable) -> None:
        """Keep `key` resident (host, and its slot once it has one) until unpinned.

        Pins are counted: every pin needs its unpin.
        """
        with self._lock:
            self._user_pins[key] = self._user_pins.get(key, 0) + 1
            self.hold(key)
            if self._user_pins[key] == 1 and key in self._slots:
                self._slots.pin(key)

    def unpin(self, key: Hashable) -> None:
        with self._lock:
            count = self._user_pins.get(key, 0)
            if count <= 0:
                return
            self.release(key)
            if count == 1:
                del self._user_pins[key]
                if key in self._slots:
                    self._slots.unpin(key)
            else:
                self._user_pins[key] = count - 1

    def evict(self, key: Hashable) -> list[Tier]:
        """Drop `key` from the slot and host tiers where nothing holds it (no pin, no request
        admitted or running on it); the store keeps it. Returns the tiers it left. A later
        request loads it again (same key, same bytes)."""
        left: list[Tier] = []
        with self._lock:
            # every lease holds the host entry for its whole life (see `acquire`), so an
            # unheld host entry means no job is queued or running on the key's slot
            if key in self._user_pins or key in self._pending_pins or self._host.is_pinned(key):
                return left
            if key in self._slots and not self._slots.is_pinned(key):
                slot = self._slots.pop(key)
                if slot:  # 0 is an activation's placeholder (never seen outside `activate`)
                    self._free.append(slot)  # no row uses it; the next load overwrites it
                left.append(Tier.SLOT)
            if key in self._host:
                self._host.pop(key)
                left.append(Tier.HOST)
            self._publish_counts()
        return left

    def hold(self, key: Hashable) -> None:
        """Keep `key` in host memory (not necessarily in a slot) until `release`, e.g. while a
        request for it waits for the engine. Counted, like pins; applies on arrival if absent."""
        with self._lock:
            if key in self._host:
                self._host.pin(key)
            else:
                self._pending_pins[key] = self._pending_pins.get(key, 0) + 1

    def release(self, key: Hashable) -> None:
        with self._lock:
            if self._pending_pins.get(key, 0) > 0:
                self._pending_pins[key] -= 1
                if self._pending_pins[key] <= 0:
                    del self._pending_pins[key]
            else:
                self._host.unpin(key)

    @property
    def max_slots(self) -> int:
        return self._slots.max_entries or 0

    def free_slots_for_batch(self) -> int:
        """Distinct adapters one batch may use: slots that are not pinned."""
        with self._lock:
            pinned = sum(1 for k in self._slots.keys() if self._slots.is_pinned(k))
        return max(1, self.max_slots - pinned)

    def has_host(self, key: Hashable) -> bool:
        """Whether `key`'s weights are in host memory now (no LRU touch, no metrics)."""
        with self._lock:
            return key in self._host

    def is_pinned(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._user_pins

    def keys(self) -> tuple[list[Hashable], list[Hashable]]:
        """The adapter keys in slots, and in host memory (e.g. for routing and operators)."""
        with self._lock:
            return list(self._slots.keys()), list(self._host.keys())

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {Tier.SLOT: len(self._slots), Tier.HOST: len(self._host)}

    def close(self) -> None:
        self.loader.close()

    # ---- engine thread ----------------------------------------------------------------------

    def activate(self, keys: Iterable[Hashable]) -> dict[Hashable, int]:
        """Slot indices for `keys` (all must be host- or slot-resident), loading slots as needed.

        Slots of the keys asked for together are never evicted for one another. Raises
        NoCapacity if they do not all fit (more distinct adapters than slots that aren't pinned).
        """
        wanted = list(dict.fromkeys(keys))
        handles: dict[Hashable, int] = {}
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
                if not self._slots.can_admit(protected=wanted):
                    raise NoCapacity(f"all {self._slots.max_entries} adapter slots are pinned or in use")
                weights = weights.checked(self.engine.info)
                self._slots.put(key, 0, protected=wanted)  # evicts the LRU slot if all are taken
                handle = self._free.pop()
                self._slots.put(key, handle, protected=wanted)
                self.table.load(handle, weights)  # the one copy: host tier -> slot buffers
                if key in self._user_pins:
                    self._slots.pin(key)
                handles[key] = handle
            self._publish_counts()
        return handles

    def _evict_slot(self, key: Hashable, slot: int) -> None:
        if slot:  # 0: the placeholder of an activation in progress
            self._free.append(slot)  # overwritten by the next load into it
        self._count_evict(Tier.SLOT)

    # ---- internals --------------------------------------------------------------------------

    def _admit_host(self, key: Hashable, weights: LoraWeights) -> None:
        with self._lock:
            try:
                self._host.put(key, weights)
            except RuntimeError as e:
                raise NoCapacity("host adapter cache is full of pinned adapters") from e
            for _ in range(self._pending_pins.pop(key, 0)):
                self._host.pin(key)
            self._publish_counts()

    def _count_evict(self, tier: Tier) -> None:
        self.metrics.evictions.labels(tier).inc()

    def _publish_counts(self) -> None:
        self.metrics.resident.labels(Tier.SLOT).set(len(self._slots))
        self.metrics.resident.labels(Tier.HOST).set(len(self._host))
