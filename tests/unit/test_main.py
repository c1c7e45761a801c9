"""taskserve-server's process-level setup."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from taskserve.server.main import _freeze_startup_objects


class _LoadingApp:
    def __init__(self) -> None:
        self.loaded = asyncio.Event()

    async def wait_until_loaded(self) -> None:
        await self.loaded.wait()


async def test_startup_objects_are_frozen_only_after_the_repository_loaded() -> None:
    app: Any = _LoadingApp()
    gc.unfreeze()
    task = asyncio.create_task(_freeze_startup_objects(app))
    await asyncio.sleep(0.01)
    assert gc.get_freeze_count() == 0  # still loading: nothing frozen yet
    app.loaded.set()
    await task
    try:
        assert gc.get_freeze_count() > 1000  # this test process's modules at least
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
