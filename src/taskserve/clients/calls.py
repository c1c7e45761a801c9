"""Invoke one RPC with the client's deadline and metadata, turning gRPC errors into typed ones.

Every call the clients make goes through these two small classes, so the
"deadline on every call" and "typed exceptions" rules hold in one place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

import grpc
import grpc.aio

from taskserve.clients.errors import from_rpc_error
from taskserve.clients.options import ClientOptions

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class SyncCaller:
    """Blocking calls; thread-safe (grpc channels are)."""

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        self._metadata = options.metadata or None

    def deadline(self, timeout: float | None) -> float:
        return self.options.timeout_s if timeout is None else timeout

    def unary(self, method: grpc.UnaryUnaryMultiCallable[Req, Resp], request: Req, timeout: float | None) -> Resp:
        try:
            return method(request, timeout=self.deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def server_stream(
        self, method: grpc.UnaryStreamMultiCallable[Req, Resp], request: Req, timeout: float | None
    ) -> Iterator[Resp]:
        call = method(request, timeout=self.deadline(timeout), metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            # A consumer that stops early (break, close) cancels the stream instead of leaking it.
            call.cancel()


class AsyncCaller:
    """asyncio calls on a grpc.aio channel; use from the loop the channel was created on."""

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        self._metadata = grpc.aio.Metadata(*options.metadata) if options.metadata else None

    def deadline(self, timeout: float | None) -> float:
        return self.options.timeout_s if timeout is None else timeout

    async def unary(
        self, method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req, timeout: float | None
    ) -> Resp:
        try:
            return await method(request, timeout=self.deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def server_stream(
        self, method: grpc.aio.UnaryStreamMultiCallable[Req, Resp], request: Req, timeout: float | None
    ) -> AsyncIterator[Resp]:
        call = method(request, timeout=self.deadline(timeout), metadata=self._metadata)
        try:
            async for item in call:
                yield item
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            # A consumer that stops early (break) cancels the stream instead of leaking it.
            call.cancel()
