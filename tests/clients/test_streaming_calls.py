"""The server-streaming call helpers (what streaming generation builds on): deadlines, typed
errors mid-stream, and cancellation when the consumer stops early."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from taskserve.clients import ClientOptions, DeadlineExceeded, InvalidArgument
from taskserve.clients._async.calls import AsyncCaller
from taskserve.clients._sync.calls import SyncCaller
from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from tests.clients.client_fakes import Recorder, ServerThread
from tests.support.waiting import until, wait_until

METHOD = "/test.Streamer/Count"
Req, Resp = pb.ModelReadyRequest, pb.ServerMetadataResponse


def _register(server: grpc.aio.Server, rec: Recorder) -> None:
    async def count(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        """Streams "0".."n-1" for name "n"; "fail" aborts after two items; "slow" waits between items."""
        rec.requests.append(request)
        n = 1000 if request.name in ("slow", "endless") else 3 if request.name == "fail" else int(request.name)
        sent = 0
        try:
            for i in range(n):
                if request.name == "fail" and i == 2:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad token at position 2")
                await asyncio.sleep(0.5 if request.name == "slow" else 0.001)
                yield Resp(name=str(i))
                sent += 1
        except asyncio.CancelledError:
            rec.metadata.append({"end": "cancelled", "sent": str(sent)})
            raise
        rec.metadata.append({"end": "completed", "sent": str(sent)})

    handler = grpc.unary_stream_rpc_method_handler(
        count, request_deserializer=Req.FromString, response_serializer=Resp.SerializeToString
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Streamer", {"Count": handler}),))


@pytest.fixture(scope="module")
def streamer() -> Any:
    with ServerThread(register=_register) as server:
        yield server


def test_sync_stream_items_errors_and_deadline(streamer: ServerThread) -> None:
    caller = SyncCaller(ClientOptions(timeout_s=5))
    with grpc.insecure_channel(streamer.target) as channel:
        method = channel.unary_stream(METHOD, Req.SerializeToString, Resp.FromString)
        assert [r.name for r in caller.server_stream(method, Req(name="4"), None)] == ["0", "1", "2", "3"]
        got: list[str] = []
        with pytest.raises(InvalidArgument, match="bad token at position 2"):
            for r in caller.server_stream(method, Req(name="fail"), None):
                got.append(r.name)
        assert got == ["0", "1"]
        with pytest.raises(DeadlineExceeded):
            list(caller.server_stream(method, Req(name="slow"), 0.2))
        streamer.rec.metadata.clear()
        stream = caller.server_stream(method, Req(name="endless"), None)
        for r in stream:
            if r.name == "5":
                break
        stream.close()
        wait_until(lambda: streamer.rec.metadata, "the server to learn of the cancellation", timeout=10)
        [end] = streamer.rec.metadata
        assert end["end"] == "cancelled" and int(end["sent"]) < 1000


async def test_async_stream_and_early_break_cancels(streamer: ServerThread) -> None:
    caller = AsyncCaller(ClientOptions(timeout_s=5))
    async with grpc.aio.insecure_channel(streamer.target) as channel:
        method = channel.unary_stream(METHOD, Req.SerializeToString, Resp.FromString)
        assert [r.name async for r in caller.server_stream(method, Req(name="3"), None)] == ["0", "1", "2"]
        with pytest.raises(InvalidArgument):
            async for _ in caller.server_stream(method, Req(name="fail"), None):
                pass
        streamer.rec.metadata.clear()
        stream = caller.server_stream(method, Req(name="endless"), None)
        async for r in stream:
            if r.name == "5":
                break
        await stream.aclose()  # what `async for` over a generator does when the loop is left
        # The server learns of the cancellation asynchronously.
        await until(lambda: streamer.rec.metadata, "the server to learn of the cancellation", timeout=10)
        [end] = streamer.rec.metadata
        assert end["end"] == "cancelled" and int(end["sent"]) < 1000
