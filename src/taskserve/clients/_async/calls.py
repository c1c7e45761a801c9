"""Invoke one RPC with the client's deadline and metadata, turning gRPC errors into typed ones.

Every call the client makes goes through this one small class, so the "deadline on every
call" and "typed exceptions" rules hold in one place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import grpc
import grpc.aio

from taskserve.clients.errors import from_rpc_error
from taskserve.clients.options import ClientOptions

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Item = TypeVar("Item")


class AsyncCaller:
    """asyncio calls on a grpc.aio channel; use from the loop the channel was created on."""

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        # Both grpc flavours take the (key, value) pairs as they are.
        self._metadata = options.metadata or None

    def deadline(self, timeout: float | None) -> float:
        return self.options.timeout_s if timeout is None else timeout

    async def unary(
        self, method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req, timeout: float | None
    ) -> Resp:
        try:
            return await method(request, timeout=self.deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def server_stream(
        self, method: grpc.aio.UnaryStreamMultiCallable[Req, Resp], request: Req, timeout: float | None
    ) -> AsyncIterator[Resp]:
        return self.streamed(method, request, timeout, _unchanged)

    async def streamed(
        self,
        method: grpc.aio.UnaryStreamMultiCallable[Req, Resp],
        request: Req,
        timeout: float | None,
        convert: Callable[[Resp], Item],
    ) -> AsyncIterator[Item]:
        """The stream's messages, each through ``convert``."""
        call = method(request, timeout=self.deadline(timeout), metadata=self._metadata)
        try:
            async for message in call:
                yield convert(message)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            # A consumer that stops early (break, close) cancels the stream instead of leaking it.
            call.cancel()


def _unchanged(message: Resp) -> Resp:
    return message
