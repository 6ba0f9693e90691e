"""The predictor's in-memory caches: a thread-safe LRU cache bounded by bytes (:class:`ByteCache`).

:class:`casam.inference.predictor.CASAMPredictor` keeps two of them: frozen and aligned embeddings, and decoder
answers per prompt, for as long as the predictor serves. (Not to be confused with the embedding cache of
training and the benchmark, :class:`casam.scoring.samples.EmbeddingCache`, which keeps float16 embeddings of
labelled images on disk across runs, nor with the background encoder
:class:`casam.inference.prefetch.Prefetcher`, which fills the predictor's embedding ByteCache ahead of a click.)

Every entry carries its size in bytes; the cache evicts the least recently used entries until the sum fits
``max_bytes`` (an entry larger than the whole budget is not kept). :meth:`ByteCache.get_or_compute` runs the
computation of a missing key once: a second thread asking for the same key while the first computes it waits
for that result instead of computing it again (a background encoder and a click asking for the same slice).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import numpy as np
import torch

MiB = 2**20


def nbytes(value: Any) -> int:
    """Bytes held by a value: tensors and arrays (also inside dataclasses, tuples, lists and dicts) are counted.

    Args:
        value: the cached value.

    Returns:
        The sum of the tensors' and arrays' buffer sizes (small Python objects count 0).
    """
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if hasattr(value, "__dict__"):
        return sum(nbytes(v) for v in vars(value).values())
    return 0


class ByteCache:
    """LRU cache whose entries together hold at most ``max_bytes`` bytes (and at most ``max_entries`` entries).

    Args:
        max_bytes: byte budget of all entries (0 = keep nothing).
        max_entries: optional bound on the number of entries (None = bytes only).
    """

    def __init__(self, max_bytes: int, max_entries: Optional[int] = None):
        self.max_bytes = max(0, int(max_bytes))
        self.max_entries = None if max_entries is None else max(0, int(max_entries))
        self._items: "OrderedDict[Hashable, Tuple[Any, int]]" = OrderedDict()
        self._bytes = 0
        self._pending: Dict[Hashable, threading.Event] = {}
        self._waiting: Dict[Hashable, int] = {}  # key → threads waiting for another thread's computation of it
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def bytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def get(self, key: Hashable) -> Any:
        """The value under ``key`` (marked recently used), or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: Any, size: Optional[int] = None) -> None:
        """Stores a value, evicting the least recently used entries until the budget holds.

        Args:
            key: cache key.
            value: the value.
            size: its size in bytes (default :func:`nbytes`).
        """
        size = nbytes(value) if size is None else int(size)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                return
            self._items[key] = (value, size)
            self._bytes += size
            self._evict()

    def _evict(self) -> None:
        while self._items and (self._bytes > self.max_bytes
                               or (self.max_entries is not None and len(self._items) > self.max_entries)):
            _, (_, size) = self._items.popitem(last=False)
            self._bytes -= size
            self.evictions += 1

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Tuple[Any, bool]:
        """The cached value, or ``compute()`` stored under ``key``; concurrent callers of one key compute once.

        Args:
            key: cache key.
            compute: builds the value when it is missing.

        Returns:
            (value, True when it came from the cache or from another thread's computation).

        Raises:
            Whatever ``compute`` raises (waiting threads then compute themselves).
        """
        while True:
            with self._lock:
                item = self._items.get(key)
                if item is not None:
                    self._items.move_to_end(key)
                    self.hits += 1
                    return item[0], True
                event = self._pending.get(key)
                if event is None:
                    self._pending[key] = threading.Event()
                    self.misses += 1
                    break
                self._waiting[key] = self._waiting.get(key, 0) + 1
            event.wait()
            with self._lock:
                self._waiting[key] -= 1
                if not self._waiting[key]:
                    del self._waiting[key]
                item = self._items.get(key)
            if item is not None:
                return item[0], True
        try:
            value = compute()
            self.put(key, value)
            return value, False
        finally:
            with self._lock:
                self._pending.pop(key).set()

    def awaited(self, key: Hashable) -> bool:
        """True while another thread waits for this key's computation (its computer should not pause)."""
        with self._lock:
            return key in self._waiting

    def discard(self, match: Callable[[Hashable], bool]) -> int:
        """Removes every entry whose key satisfies ``match``.

        Returns:
            The number of entries removed.
        """
        with self._lock:
            gone = [k for k in self._items if match(k)]
            for k in gone:
                self._bytes -= self._items.pop(k)[1]
            return len(gone)

    def clear(self) -> None:
        """Removes every entry."""
        self.discard(lambda _: True)

    def stats(self) -> Dict[str, int]:
        """Entries, bytes held, byte budget, hits, misses and evictions so far."""
        with self._lock:
            return {"entries": len(self._items), "bytes": self._bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                    "misses": self.misses, "evictions": self.evictions}
