"""taskserve-server's process-level setup."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from taskserve.server.main import _freeze_startup_objects


class _LoadingApp:
    def __init__(self) -> None:
        self.loaded = asyncio.Event()
        self.waiting = asyncio.Event()  # someone awaits the load

    async def wait_until_loaded(self) -> None:
        self.waiting.set()
        await self.loaded.wait()


async def test_startup_objects_are_frozen_only_after_the_repository_loaded() -> None:
    app: Any = _LoadingApp()
    gc.unfreeze()
    task = asyncio.create_task(_freeze_startup_objects(app))
    # Until it waits on the load (or ends without waiting, which fails below), not by the clock.
    waiting = asyncio.create_task(app.waiting.wait())
    await asyncio.wait([task, waiting], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    assert app.waiting.is_set() and not task.done()
    assert gc.get_freeze_count() == 0  # still loading: nothing frozen yet
    app.loaded.set()
    await task
    try:
        assert gc.get_freeze_count() > 1000  # this test process's modules at least
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
