"""An LRU cache of retrieval results, keyed by query, topk and the options that change the answer."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class ResultCache:
    """Least-recently-used results with hit counters; capacity 0 disables it (every lookup misses)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()  # /health reads the counters from the event loop thread
        self.hits = 0
        self.misses = 0
        # Queries repeated inside one batch (a GRPO group's samples in one request): answered by the
        # batch's own de-duplication, never looked up twice; counted to show how much repetition there is.
        self.batch_duplicates = 0

    def get(self, key: Any) -> Any | None:
        """The cached value (now most recent), or None; counts a hit or a miss."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return None

    def put(self, key: Any, value: Any) -> None:
        """Store `value`, evicting the least recently used entry beyond capacity."""
        if self.capacity == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def to_dict(self) -> dict[str, Any]:
        """Capacity, size, hits, misses and hit rate (None before any lookup)."""
        with self._lock:
            lookups = self.hits + self.misses
            return {
                "capacity": self.capacity,
                "size": len(self._items),
                "hits": self.hits,
                "misses": self.misses,
                "hit_rate": round(self.hits / lookups, 6) if lookups else None,
                "batch_duplicates": self.batch_duplicates,
            }
