"""EventStream, the SSE response: a client that stops reading has its stream ended after the
write timeout, one that disconnects has it cancelled, and either way the event source (the
generation holding a slot) is closed; an error mid-stream becomes the last event."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from taskserve.server.errors import Overloaded
from taskserve.server.frontends.http.openai_routes import _error_event
from taskserve.server.frontends.http.sse import EventStream, event


class Source:
    """An endless event source that records being closed, as a generation would free its slot."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.sent = 0
        self.closed = asyncio.Event()
        self.fail_after = fail_after

    async def events(self) -> AsyncIterator[bytes]:
        try:
            while True:
                if self.fail_after is not None and self.sent >= self.fail_after:
                    raise Overloaded("the engine is full")
                self.sent += 1
                yield event({"n": self.sent})
                await asyncio.sleep(0)
        finally:
            self.closed.set()


async def _never_disconnects() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def test_a_client_that_stops_reading_is_ended_after_the_write_timeout() -> None:
    source = Source()
    taken: list[dict[str, Any]] = []
    stalled = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        taken.append(message)
        if len(taken) > 3:  # the client's window is full: the write never completes
            stalled.set()
            await asyncio.Event().wait()

    stream = EventStream(source.events(), write_timeout=0.2, on_error=_error_event)
    await asyncio.wait_for(stream({"type": "http"}, _never_disconnects, send), timeout=10)
    assert stalled.is_set() and source.closed.is_set()
    assert stream.ended_early == "write_timeout"
    assert source.sent <= 4  # paused at the stalled write: nothing generated ahead of the client


async def test_a_client_that_disconnects_cancels_the_stream() -> None:
    source = Source()
    gone = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if len(sent) == 5:
            gone.set()
        await asyncio.sleep(0)

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    stream = EventStream(source.events(), write_timeout=30, on_error=_error_event)
    await asyncio.wait_for(stream({"type": "http"}, receive, send), timeout=10)
    assert source.closed.is_set() and stream.ended_early == "disconnected"
    assert not any(m.get("more_body") is False for m in sent)  # never finished as if complete


async def test_an_error_mid_stream_is_the_last_event() -> None:
    source = Source(fail_after=2)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    stream = EventStream(source.events(), write_timeout=30, on_error=_error_event)
    await asyncio.wait_for(stream({"type": "http"}, _never_disconnects, send), timeout=10)
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    assert sent[0]["status"] == 200
    assert bodies[:2] == [event({"n": 1}), event({"n": 2})]
    assert b'"type":"rate_limit_error"' in bodies[2] and b"the engine is full" in bodies[2]
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert source.closed.is_set()
