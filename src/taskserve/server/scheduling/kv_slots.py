"""The generation engine's KV-cache allocator: which sequence owns which cache slot.

The runner owns the memory (per-slot buffers of ``max_model_len`` positions, bound once);
this allocator owns the ids. A slot is taken when a sequence is admitted and given back
the moment it leaves (finished, stopped, cancelled, past its deadline), so the next
``schedule`` can admit a waiting sequence into it. Slots rather than paged blocks: the
reasons are in docs/generation.md ("KV cache: slots, not blocks").

Not thread-safe: owned by the engine core, which runs on one thread (the event loop).
"""

from __future__ import annotations

import heapq


class SlotAllocator:
    """Slot ids ``[0, num_slots)``; the lowest free one first, so the running slots stay
    packed at the start and a decode step's slot range (runners batch it as one call over
    a contiguous range) spans few idle slots."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError("the allocator needs at least one slot")
        self.num_slots = num_slots
        self._free = list(range(num_slots))  # a heap: already ordered
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self) -> int | None:
        """The lowest free slot, now owned by the caller; None when every slot is taken."""
        if not self._free:
            return None
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        """Give ``slot`` back. Freeing a slot that is not taken is a bookkeeping bug: raise."""
        if slot not in self._used:
            raise ValueError(f"slot {slot} is not allocated")
        self._used.remove(slot)
        heapq.heappush(self._free, slot)
