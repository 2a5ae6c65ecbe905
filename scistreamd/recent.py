"""A bounded memory of the most recent entries, for what the daemon remembers
or caches per peer, certificate or uid (an unbounded one would grow with
whatever remote parties send). Pure; thread-safe (the peer client's threads).
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Generic, Hashable, Iterator, Optional, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Recent(Generic[K, V]):
    """At most ``size`` entries; storing one beyond that drops the oldest.

    :meth:`put` makes an entry the newest; :meth:`get_or_make` does too when it
    finds one (a cache keeps what is used); ``in`` and :meth:`get` only look.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: collections.OrderedDict[K, V] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        """The keys, oldest first."""
        return iter(list(self._entries))

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: K) -> Optional[V]:
        return self._entries.get(key)

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        """The value kept for ``key``, else ``make()``'s, kept (made outside the lock:
        two threads may both make one; the later is kept). What ``make`` raises is
        not kept."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value = make()
        self.put(key, value)
        return value
