"""Who still uses a model version: requests that resolved it hold a lease until they
are answered, so a version leaving service (a reload, an unload) finishes what it
accepted before its scheduler stops and its runtimes close.

Without it a request that looked the model up before a swap, then awaited something
(tokenizing on the worker pool, a task build), reached the old scheduler after it had
stopped and failed with UNAVAILABLE ("shutting down").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class Leases:
    """Counts the requests using one model version.

    Event loop only. Take a lease in the same step as the lookup (no ``await`` between),
    so no request can hold a version without it being counted.
    """

    def __init__(self) -> None:
        self._held = 0
        self._released: asyncio.Event | None = None

    @property
    def held(self) -> int:
        return self._held

    @property
    def awaited(self) -> bool:
        """A swap or unload is waiting for the leases to be given back (tests and logs read it)."""
        return self._released is not None and not self._released.is_set()

    def take(self) -> None:
        self._held += 1

    def give_back(self) -> None:
        self._held -= 1
        if not self._held and self._released is not None:
            self._released.set()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self.take()
        try:
            yield
        finally:
            self.give_back()

    async def wait_released(self, timeout_s: float) -> bool:
        """Wait until no request holds a lease, at most ``timeout_s`` seconds; False
        when some still did then (a stream that outlasts the grace, a stuck client)."""
        if not self._held:
            return True
        if self._released is None:
            self._released = asyncio.Event()
        try:
            async with asyncio.timeout(timeout_s):
                await self._released.wait()
        except TimeoutError:
            return False
        return True
