"""The batcher's queue: requests grouped by batching key, each group split into
priority levels kept in arrival order.

Owned by the batcher's event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

from taskserve.server.scheduling.base import InferRequest, InferResult


@dataclass(eq=False)
class PendingRequest:
    """One queued request. Compared by identity. ``cancelled`` is written on the
    event loop and read on executor threads (a plain bool: no lock needed)."""

    request: InferRequest
    future: asyncio.Future[InferResult]
    key: Hashable
    rows: int
    priority: int  # 1 is the highest
    deadline: float | None  # clock() time after which it must not be computed
    seq: int  # arrival order, breaks ties between equal priorities
    enqueued_at: float  # clock() time, for max_queue_delay
    enqueued_ns: int  # perf_counter_ns(), for queue-time metrics
    cancelled: bool = False

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass
class Candidate:
    """The requests a batch would take now, in order."""

    entries: list[PendingRequest] = field(default_factory=list)
    rows: int = 0
    # A live request of this group is left behind because it does not fit.
    blocked: bool = False
    # Requests found past their deadline (already removed from the queue).
    expired: list[PendingRequest] = field(default_factory=list)


class RequestQueue:
    def __init__(self, priority_levels: int) -> None:
        self._levels = priority_levels
        self._groups: dict[Hashable, list[deque[PendingRequest]]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, entry: PendingRequest) -> None:
        levels = self._groups.get(entry.key)
        if levels is None:
            levels = self._groups[entry.key] = [deque() for _ in range(self._levels)]
        levels[entry.priority - 1].append(entry)
        self._size += 1

    def remove(self, entry: PendingRequest) -> bool:
        """Take ``entry`` out if it is still queued; False when it already left."""
        levels = self._groups.get(entry.key)
        if levels is None:
            return False
        try:
            levels[entry.priority - 1].remove(entry)
        except ValueError:
            return False
        self._size -= 1
        self._drop_if_empty(entry.key)
        return True

    def head(self) -> PendingRequest | None:
        """The request to serve next: highest priority, then oldest."""
        best: PendingRequest | None = None
        for levels in self._groups.values():
            for level in levels:
                if level:
                    first = level[0]
                    if best is None or (first.priority, first.seq) < (best.priority, best.seq):
                        best = first
                    break
        return best

    def peek(self, key: Hashable, max_rows: int, now: float) -> Candidate:
        """The longest run of ``key``'s requests, in priority then arrival order,
        that fits in ``max_rows``. Expired requests met on the way are removed."""
        candidate = Candidate()
        for entry in self._ordered(key):
            if entry.expired(now):
                candidate.expired.append(entry)
                continue
            if candidate.rows + entry.rows > max_rows:
                candidate.blocked = True
                break
            candidate.entries.append(entry)
            candidate.rows += entry.rows
        for entry in candidate.expired:
            self.remove(entry)
        return candidate

    def _ordered(self, key: Hashable) -> Iterator[PendingRequest]:
        # Lazy: a batch looks at most max_rows live entries, not the whole queue.
        for level in self._groups.get(key, ()):
            yield from level

    def take(self, entries: list[PendingRequest]) -> None:
        """Remove the given (queued) entries."""
        for entry in entries:
            if not self.remove(entry):
                raise RuntimeError("batcher bug: took a request that was not queued")

    def drain(self) -> list[PendingRequest]:
        """Remove and return everything queued."""
        everything = [e for levels in self._groups.values() for level in levels for e in level]
        self._groups.clear()
        self._size = 0
        return everything

    def _drop_if_empty(self, key: Hashable) -> None:
        levels = self._groups.get(key)
        if levels is not None and not any(levels):
            del self._groups[key]
