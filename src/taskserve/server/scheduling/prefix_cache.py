"""The generation engine's prefix index: which cache slot holds which token prefix.

Slots hold a sequence's keys and values position by position (``kv_slots.py``); a new
prompt that starts with tokens some slot already holds can start from a copy of those
positions (or take the slot over, when nobody uses it) and compute only the rest. This
index finds such a slot: every full block of ``block`` tokens a slot holds is keyed by a
hash chained over the blocks before it (as vLLM's block hashes), so one dict lookup per
prompt block walks down the longest shared prefix, and a slot found at block ``i`` holds
blocks ``0..i`` as well. The tokens themselves are kept to check a hit (a hash collision
never serves another prompt's cache) and to extend it past the last full block.

It knows nothing of who uses a slot: the engine core (``engine_core.py``) registers the
positions a running sequence has actually computed, keeps a finished sequence's slot as
an evictable cached prefix, and forgets a slot when it is freed or evicted. Not
thread-safe: owned by the core, on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# Tokens per hashed block: a prefix shorter than one block is not worth a lookup and a copy.
BLOCK_TOKENS = 16


@dataclass(eq=False)
class _Entry:
    tokens: Sequence[int]
    # Positions [0, length) of the slot hold tokens[:length].
    length: int = 0
    # Chained hash of each full block inside length.
    hashes: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """``slot`` holds the first ``length`` tokens of the prompt looked up."""

    slot: int
    length: int


class PrefixIndex:
    def __init__(self, block: int = BLOCK_TOKENS) -> None:
        if block < 1:
            raise ValueError("a prefix block needs at least one token")
        self.block = block
        self._slots_of: dict[int, dict[int, None]] = {}  # block hash -> the slots holding it, oldest first
        self._entries: dict[int, _Entry] = {}

    def __contains__(self, slot: int) -> bool:
        return slot in self._entries

    def length(self, slot: int) -> int:
        """Positions the index says ``slot`` holds (0: none)."""
        entry = self._entries.get(slot)
        return entry.length if entry is not None else 0

    def hold(self, slot: int, tokens: Sequence[int], length: int) -> None:
        """``slot`` now holds ``tokens[:length]``. A slot's tokens only grow while one sequence
        owns it; for a new owner (or fewer positions) the slot's old blocks are dropped first."""
        entry = self._entries.get(slot)
        if entry is not None and (length < entry.length or not _same_prefix(entry.tokens, tokens, entry.length)):
            self.forget(slot)
            entry = None
        if entry is None:
            entry = self._entries[slot] = _Entry(tokens)
        entry.tokens, entry.length = tokens, length
        block = self.block
        previous = entry.hashes[-1] if entry.hashes else 0
        for start in range(len(entry.hashes) * block, length - block + 1, block):
            previous = hash((previous, tuple(tokens[start : start + block])))
            entry.hashes.append(previous)
            self._slots_of.setdefault(previous, {})[slot] = None

    def forget(self, slot: int) -> None:
        """``slot`` holds nothing reusable any more (freed, evicted, or about to be overwritten)."""
        entry = self._entries.pop(slot, None)
        if entry is None:
            return
        for key in entry.hashes:
            holders = self._slots_of.get(key)
            if holders is not None:
                holders.pop(slot, None)
                if not holders:
                    del self._slots_of[key]

    def lookup(self, prompt: Sequence[int]) -> list[PrefixHit]:
        """The slots sharing the longest run of whole blocks with ``prompt``, each with the exact
        number of leading tokens it shares (past the last whole block too); longest first."""
        block = self.block
        previous, found = 0, None
        for start in range(0, len(prompt) - block + 1, block):
            key = hash((previous, tuple(prompt[start : start + block])))
            holders = self._slots_of.get(key)
            if not holders:
                break
            previous, found = key, (start + block, holders)
        if found is None:
            return []
        matched, holders = found
        hits = []
        for slot in holders:
            entry = self._entries[slot]
            if not _same_prefix(entry.tokens, prompt, matched):
                continue  # a hash collision: not this prompt's prefix
            shared = matched
            end = min(entry.length, len(prompt))
            while shared < end and entry.tokens[shared] == prompt[shared]:
                shared += 1
            hits.append(PrefixHit(slot, shared))
        hits.sort(key=lambda h: -h.length)
        return hits


def _same_prefix(a: Sequence[int], b: Sequence[int], length: int) -> bool:
    return len(a) >= length and len(b) >= length and tuple(a[:length]) == tuple(b[:length])
