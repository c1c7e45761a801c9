"""StreamGate with a fake servicer context: the order of what a write timeout does,
and the per-connection count (the real-network behaviour is in tests/robustness/test_slow_readers.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import grpc
import pytest

from taskserve.server.frontends.grpc.streams import StreamGate, StreamLimits


class FakeContext:
    """Writes block until ``reads`` allows them; abort records its status and then blocks
    like grpc's does when the status waits behind an unread message."""

    def __init__(self, peer: str = "ipv4:10.0.0.1:5000", reads: int = 1_000_000) -> None:
        self._peer, self.reads = peer, reads
        self.written: list[Any] = []
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.abort_started = asyncio.Event()
        self.write_blocked = asyncio.Event()  # a write waits on the client's window

    def peer(self) -> str:
        return self._peer

    async def write(self, item: Any) -> None:
        if len(self.written) >= self.reads:
            self.write_blocked.set()
            await asyncio.Event().wait()  # the client's window is full
        self.written.append(item)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        self.abort_started.set()
        await asyncio.Event().wait()


async def _answers(closed: list[str], n: int = 100) -> AsyncGenerator[int, None]:
    try:
        for i in range(n):
            yield i
    finally:
        closed.append("closed")


async def test_a_write_timeout_closes_the_answers_then_ends_with_deadline_exceeded() -> None:
    gate = StreamGate(StreamLimits(write_timeout_s=0.05, max_per_connection=1))
    context = FakeContext(reads=3)
    closed: list[str] = []
    serving = asyncio.create_task(gate.serve(_answers(closed), context))  # type: ignore[arg-type]
    await asyncio.wait_for(context.abort_started.wait(), 5)
    assert closed == ["closed"]  # the generator (a generation slot) was freed before the status
    assert context.written == [0, 1, 2]  # one write at a time: nothing asked for past the blocked one
    assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "--stream-write-timeout" in context.aborted[1]
    # While the status waits on the client, the stream still counts against its connection.
    other = FakeContext()
    refusing = asyncio.create_task(gate.serve(_answers([]), other))  # type: ignore[arg-type]
    await asyncio.wait_for(other.abort_started.wait(), 5)
    refusing.cancel()  # the fake's abort blocks; grpc's raises AbortError once the status is sent
    assert other.written == []
    assert other.aborted is not None and other.aborted[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 streams open" in other.aborted[1] and "--max-streams-per-connection" in other.aborted[1]
    serving.cancel()  # the client goes away
    with pytest.raises(asyncio.CancelledError):
        await serving
    fresh = FakeContext()
    await asyncio.wait_for(gate.serve(_answers([], 5), fresh), 5)  # type: ignore[arg-type]
    assert fresh.written == [0, 1, 2, 3, 4] and fresh.aborted is None


async def test_connections_are_counted_apart() -> None:
    gate = StreamGate(StreamLimits(write_timeout_s=5, max_per_connection=1))
    first, second = FakeContext("ipv4:10.0.0.1:5000", reads=0), FakeContext("ipv4:10.0.0.1:5001")
    held = asyncio.create_task(gate.serve(_answers([]), first))  # type: ignore[arg-type]
    await asyncio.wait_for(first.write_blocked.wait(), 5)  # it is counted and waits on its first write
    await asyncio.wait_for(gate.serve(_answers([], 3), second), 5)  # type: ignore[arg-type]
    assert second.written == [0, 1, 2]
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held


def test_limits_refuse_unsafe_values() -> None:
    with pytest.raises(ValueError, match="write timeout"):
        StreamLimits(write_timeout_s=0)
    with pytest.raises(ValueError, match="per connection"):
        StreamLimits(max_per_connection=0)
