"""Waiting on a condition with a deadline, never on the clock alone.

A test that sleeps a fixed time and then looks passes or fails with the machine's load;
these wait for the thing itself (a metric, a status, an event) and, when it does not
come, fail saying what was awaited. The deadline is a hang guard, not a timing check:
keep it generous."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_until(condition: Callable[[], object], what: str, timeout: float = 30.0, interval: float = 0.01) -> None:
    """Poll ``condition`` until it is truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(interval)


async def until(condition: Callable[[], object], what: str, timeout: float = 30.0, interval: float = 0.005) -> None:
    """``wait_until`` for coroutines: yields to the event loop between polls."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        await asyncio.sleep(interval)


async def other_tasks_done(what: str, timeout: float = 30.0) -> None:
    """Wait until every other task of the running loop has finished: then nothing the code
    under test started can still act, so "it did not happen" is a fact, not a time window.
    Use it only in tests that own their event loop's tasks (no server in the same loop)."""
    me = asyncio.current_task()
    await until(lambda: all(t is me or t.done() for t in asyncio.all_tasks()), what, timeout)
