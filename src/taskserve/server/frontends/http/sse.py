"""Server-sent events as an ASGI response, with the backpressure a stream needs.

Each event is awaited as it is written: a client that stops reading pauses the stream
(uvicorn awaits the socket draining), and one that has not taken an event for
``write_timeout`` seconds has its stream ended, so the generation behind it stops and frees
its slot. A client that disconnects cancels the stream at once. Either way the event source
is closed (``aclose``), which is what releases the task's resources.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def event(payload: object) -> bytes:
    """One ``data:`` event; JSON never holds a raw newline, so one line is enough."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class EventStream(Response):
    """An ASGI response streaming ``events`` (already framed). ``on_error`` turns an
    exception raised by the source mid-stream into a last event (the status line is sent).
    A Response subclass only so that route handlers may return it; it writes itself."""

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        write_timeout: float,
        on_error: Callable[[BaseException], bytes],
    ) -> None:
        # What FastAPI may read or set on a returned Response; the headers sent are _stream's.
        self.status_code = 200
        self.background: BackgroundTask | None = None
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self._events = events
        self._write_timeout = write_timeout
        self._on_error = on_error
        # Why the stream ended early, for logs and tests: "disconnected", "write_timeout" or None.
        self.ended_early: str | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.ensure_future(self._stream(send))
        watching = asyncio.ensure_future(_disconnected(receive))
        try:
            done, _ = await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
            if watching in done and not streaming.done():
                self.ended_early = "disconnected"
                streaming.cancel()
            await asyncio.gather(streaming, return_exceptions=True)
        finally:
            watching.cancel()
            if not streaming.done():
                streaming.cancel()
            await asyncio.gather(streaming, watching, return_exceptions=True)
            await self._events.aclose()  # type: ignore[attr-defined]

    async def _stream(self, send: Send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            # Proxies (nginx) must pass each event on at once, not buffer the stream.
            (b"x-accel-buffering", b"no"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        try:
            async for data in self._events:
                if not await self._write(send, data):
                    return
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the status line is gone: the error travels as the last event
            if not await self._write(send, self._on_error(err)):
                return
        await self._write(send, b"", more=False)

    async def _write(self, send: Send, data: bytes, more: bool = True) -> bool:
        """Send one chunk; False when the client has not taken it within the write timeout."""
        try:
            async with asyncio.timeout(self._write_timeout):
                await send({"type": "http.response.body", "body": data, "more_body": more})
        except TimeoutError:
            self.ended_early = "write_timeout"
            log.warning("ended a stream whose client took no data for %.1fs", self._write_timeout)
            return False
        return True


async def _disconnected(receive: Receive) -> None:
    """Returns when the client goes away (the body was read before the stream began)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
