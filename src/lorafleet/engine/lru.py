"""PinnedLRU: a least-recently-used map with pinning, a capacity in entries and/or bytes,
and an eviction hook. Used for both residency tiers (engine slots and the host cache)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class PinnedLRU(Generic[K, V]):
    """Entries are evicted least recently used first; pinned entries never are.

    Args:
        max_entries: capacity in entries (None = unbounded).
        max_bytes: capacity in bytes, measured by `size` (None = unbounded).
        on_evict: called with (key, value) after an entry is evicted to make room.
    """

    def __init__(
        self,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        size: Callable[[V], int] = lambda _: 0,
        on_evict: Callable[[K, V], None] | None = None,
    ) -> None:
        if max_entries is not None and max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._size = size
        self._on_evict = on_evict
        self._items: OrderedDict[K, V] = OrderedDict()
        self._pins: dict[K, int] = {}
        self.nbytes = 0

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[K]:
        """Keys from least to most recently used."""
        return list(self._items)

    def get(self, key: K) -> V | None:
        """The value (marking it most recently used), or None."""
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def can_admit(self, protected: Iterable[K] = ()) -> bool:
        """Whether one more entry fits after evicting everything evictable."""
        keep = set(protected) | set(self._pins)
        evictable = sum(1 for k in self._items if k not in keep)
        return self.max_entries is None or len(self._items) - evictable < self.max_entries

    def put(self, key: K, value: V, protected: Iterable[K] = ()) -> None:
        """Insert (or replace) `key`, evicting LRU entries not pinned and not in `protected`.

        Raises RuntimeError if no room can be made (everything left is pinned/protected).
        """
        if key in self._items:
            self.nbytes -= self._size(self._items.pop(key))
        keep = set(protected) | set(self._pins) | {key}
        self._make_room(1, self._size(value), keep)
        self._items[key] = value
        self.nbytes += self._size(value)

    def pop(self, key: K) -> V | None:
        value = self._items.pop(key, None)
        if value is not None:
            self.nbytes -= self._size(value)
        self._pins.pop(key, None)
        return value

    def pin(self, key: K) -> None:
        if key not in self._items:
            raise KeyError(key)
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: K) -> None:
        count = self._pins.get(key, 0)
        if count <= 1:
            self._pins.pop(key, None)
        else:
            self._pins[key] = count - 1

    def is_pinned(self, key: K) -> bool:
        return key in self._pins

    def _over(self, extra_entries: int, extra_bytes: int) -> bool:
        over_n = self.max_entries is not None and len(self._items) + extra_entries > self.max_entries
        over_b = self.max_bytes is not None and self.nbytes + extra_bytes > self.max_bytes and len(self._items) > 0
        return over_n or over_b

    def _make_room(self, extra_entries: int, extra_bytes: int, keep: set[K]) -> None:
        while self._over(extra_entries, extra_bytes):
            victim = next((k for k in self._items if k not in keep), None)
            if victim is None:
                raise RuntimeError("no evictable entry: every resident entry is pinned or in use")
            value = self._items.pop(victim)
            self.nbytes -= self._size(value)
            if self._on_evict is not None:
                self._on_evict(victim, value)
