"""Backpressure for response streams: clients that do not read must not hold the server.

Every response-streaming method registered through ``limit_streams(server, ...)`` (the
typed generation, transform and image-generation streams, v2 ModelStreamInfer) is
served here instead of by grpc's own loop over the handler's async generator:

* each answer is written and the write awaited before the next is asked for, so a
  client that stops reading pauses its stream (HTTP/2 flow control fills, the write
  waits) and nothing piles up in the server;
* a write that waits longer than ``write_timeout_s`` ends the stream: the handler's
  generator is closed at once (for generation, the task's cancellation path frees the
  generation slot and the engine's sequence), then the stream is ended with
  DEADLINE_EXCEEDED. grpc.aio has no server-side RST_STREAM, so that status reaches
  the client behind its unread answers; until the client reads or goes away the ended
  stream costs one unsent message and keeps counting against its connection's cap;
* a connection (keyed on the peer address grpc reports) has at most
  ``max_per_connection`` such streams open; one more gets RESOURCE_EXHAUSTED;
* a client that disconnects or cancels ends its stream quietly: grpc logs one DEBUG
  line ("RPC cancelled"), instead of an ERROR with a traceback for the write that failed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import grpc

from taskserve.server.errors import DeadlineExceeded, Overloaded
from taskserve.server.frontends.grpc.status import describe

log = logging.getLogger(__name__)

# grpc's RpcMethodHandler (a namedtuple at run time), typed loosely as in malformed.py.
Handler = Any
Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class StreamLimits:
    """``write_timeout_s``: longest one answer may wait for the client to read (> 0).
    ``max_per_connection``: response streams one client connection may hold open (>= 1)."""

    write_timeout_s: float = 30.0
    max_per_connection: int = 32

    def __post_init__(self) -> None:
        if not self.write_timeout_s > 0:
            raise ValueError(f"stream write timeout must be > 0 seconds, got {self.write_timeout_s}")
        if self.max_per_connection < 1:
            raise ValueError(f"streams per connection must be >= 1, got {self.max_per_connection}")


class StreamGate:
    """Serves response streams under ``limits``; one per server, used on its event loop only."""

    def __init__(self, limits: StreamLimits) -> None:
        self.limits = limits
        # Peer connection -> its response streams open now (no entry at zero).
        self._open: dict[str, int] = {}

    @contextmanager
    def _counted(self, peer: str) -> Iterator[None]:
        held = self._open.get(peer, 0)
        if held >= self.limits.max_per_connection:
            raise Overloaded(
                f"this connection already has {held} streams open, the server's limit per connection "
                "(--max-streams-per-connection); finish or cancel one before opening another"
            )
        self._open[peer] = held + 1
        try:
            yield
        finally:
            left = self._open[peer] - 1
            if left:
                self._open[peer] = left
            else:
                del self._open[peer]

    async def serve(self, responses: AsyncGenerator[Any, None], context: Context) -> None:
        """Write ``responses`` to the client one awaited write at a time; closes ``responses``."""
        try:
            peer = context.peer()
            try:
                with self._counted(peer):
                    try:
                        await self._write_all(responses, context, peer)
                    except DeadlineExceeded as err:
                        await _end(context, err)  # still counted: the status waits on the client
            except Overloaded as err:
                await _end(context, err)
        finally:
            await responses.aclose()  # idempotent; covers the refusal and grpc's cancellation

    async def _write_all(self, responses: AsyncGenerator[Any, None], context: Context, peer: str) -> None:
        timeout = self.limits.write_timeout_s
        async for item in responses:
            write = asyncio.ensure_future(context.write(item))
            try:
                done, _ = await asyncio.wait((write,), timeout=timeout)
            except BaseException:
                write.cancel()
                raise
            if not done:
                # Free what the stream holds (its generation slot, its queued answers) now;
                # the status then waits behind the unread answer (see the module docstring).
                write.add_done_callback(_consume)
                await responses.aclose()
                log.info(
                    "ended a stream of %s: its client read nothing for %gs (--stream-write-timeout)", peer, timeout
                )
                raise DeadlineExceeded(
                    f"the stream was ended: the client read no answer for {timeout:g} s "
                    "(the server's --stream-write-timeout); read the stream as it arrives"
                )
            try:
                write.result()
            except grpc.aio.InternalError:
                # The client went away mid-write (grpc reports the failed batch): a normal
                # end, left to grpc's cancellation handling, which logs it at DEBUG.
                raise asyncio.CancelledError() from None


async def _end(context: Context, err: Overloaded | DeadlineExceeded) -> None:
    code, message = describe(err)
    try:
        await context.abort(code, message)
    except grpc.aio.InternalError:
        raise asyncio.CancelledError() from None  # the client left before the status reached it


def _consume(write: asyncio.Future[Any]) -> None:
    if not write.cancelled():
        write.exception()  # retrieved: a write that fails after the stream ended is not news


def _limit_handler(handler: Handler, gate: StreamGate) -> Handler:
    if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
        inner_us: Any = handler.unary_stream

        async def unary_stream(request: Any, context: Context) -> None:
            await gate.serve(inner_us(request, context), context)

        return handler._replace(unary_stream=unary_stream)
    if handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream):
        inner_ss: Any = handler.stream_stream

        async def stream_stream(requests: Any, context: Context) -> None:
            await gate.serve(inner_ss(requests, context), context)

        return handler._replace(stream_stream=stream_stream)
    return handler  # unary answers, and streams that write themselves


class _LimitedGeneric(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, gate: StreamGate) -> None:
        self._inner, self._gate = inner, gate
        self._cache: dict[str, Handler | None] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method = handler_call_details.method
        if method not in self._cache:
            found = self._inner.service(handler_call_details)
            self._cache[method] = None if found is None else _limit_handler(found, self._gate)
        return self._cache[method]


class _LimitedServer:
    """Stands in for the server while services register; everything else passes through."""

    def __init__(self, server: grpc.aio.Server, gate: StreamGate) -> None:
        self._server, self._gate = server, gate

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_LimitedGeneric(h, self._gate) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Handler]) -> None:
        limited = {name: _limit_handler(h, self._gate) for name, h in handlers.items()}
        self._server.add_registered_method_handlers(service, limited)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def limit_streams(server: grpc.aio.Server, gate: StreamGate) -> grpc.aio.Server:
    """``server`` for ``add_*_to_server`` calls: the response streams of the services they
    add are served by ``gate`` (write timeout, per-connection cap). The wrapping happens
    once per method, at registration."""
    return cast(grpc.aio.Server, _LimitedServer(server, gate))
