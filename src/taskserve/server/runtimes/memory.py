"""Give the heap memory a retired model version freed back to the operating system.

glibc keeps freed blocks in its arenas for reuse and returns them to the system only
from the top of the heap; a model version that leaves service frees hundreds of MB
(its sessions' weights and arenas, its tokenizer) spread through those arenas, so the
process's RSS kept them: it swung by hundreds of MB from one swap to the next although
nothing was leaked. ``malloc_trim`` hands the free pages back. Elsewhere (musl, macOS)
this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] | None = getattr(ctypes.CDLL(name), "malloc_trim", None)
    except OSError:
        return None
    return trim


def release_freed_memory() -> bool:
    """Return free heap pages to the system (blocking: a few ms on a large heap, so call
    it off the event loop). False when the C library has no ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
