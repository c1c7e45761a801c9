"""Malformed request messages get INVALID_ARGUMENT, without a traceback in the log.

grpc.aio calls a method's ``request_deserializer`` itself; when it raises (bytes
that are not the message), grpc logs an ERROR with the traceback and answers
UNKNOWN, once per request. Here each registered method's deserializer is wrapped
so a failure yields a ``Malformed`` marker instead, and its handler is wrapped to
answer that marker with INVALID_ARGUMENT. The wrapping happens once, at
registration (``guard(server)`` is what the ``add_*_to_server`` functions get), so
a request pays one try block and one ``is`` test, not an interceptor.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, cast

import grpc

log = logging.getLogger(__name__)

# A grpc RpcMethodHandler (a namedtuple at run time); its stubs describe the sync API
# only, so the aio behaviours are handled as Any here.
Handler = Any
Context = grpc.aio.ServicerContext[Any, Any]

_MESSAGE = "the request is not a valid {what} message ({detail}); check the client sends this method's protobuf"


class Malformed:
    """What a wrapped deserializer returns for bytes it cannot parse."""

    __slots__ = ("detail",)

    def __init__(self, detail: str) -> None:
        self.detail = detail


def _safe_deserializer(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as err:  # noqa: BLE001 - DecodeError and anything a parser raises
            return Malformed(f"{type(err).__name__}: {str(err)[:200]}")

    return deserialize


async def _refuse(context: Context, bad: Malformed, what: str) -> None:
    log.debug("malformed %s request: %s", what, bad.detail)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _MESSAGE.format(what=what, detail=bad.detail))


def _guard_handler(handler: Handler, what: str) -> Handler:
    parse: Any = handler.request_deserializer
    if parse is None:
        return handler
    replaced: dict[str, Any] = {"request_deserializer": _safe_deserializer(parse)}
    if handler.unary_unary is not None:
        inner_uu: Any = handler.unary_unary

        async def unary_unary(request: Any, context: Context) -> Any:
            if request.__class__ is Malformed:
                await _refuse(context, request, what)
            return await inner_uu(request, context)

        replaced["unary_unary"] = unary_unary
    elif handler.unary_stream is not None:
        inner_us: Any = handler.unary_stream
        if inspect.isasyncgenfunction(inner_us):

            async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
                if request.__class__ is Malformed:
                    await _refuse(context, request, what)
                async for item in inner_us(request, context):
                    yield item

            replaced["unary_stream"] = unary_stream
        else:  # a coroutine that answers through context.write (grpc_health's Watch)

            async def unary_stream_writer(request: Any, context: Context) -> Any:
                if request.__class__ is Malformed:
                    await _refuse(context, request, what)
                return await inner_us(request, context)

            replaced["unary_stream"] = unary_stream_writer
    elif handler.stream_unary is not None or handler.stream_stream is not None:
        streaming = handler.stream_stream is not None
        inner_s: Any = handler.stream_stream if streaming else handler.stream_unary

        async def checked(requests: AsyncIterator[Any], context: Context) -> Any:
            async for request in requests:
                if request.__class__ is Malformed:
                    await _refuse(context, request, what)
                yield request

        if streaming and inspect.isasyncgenfunction(inner_s):

            async def stream_stream(requests: AsyncIterator[Any], context: Context) -> Any:
                async for item in inner_s(checked(requests, context), context):
                    yield item

            replaced["stream_stream"] = stream_stream
        elif streaming:  # answers through context.write

            async def stream_stream_writer(requests: AsyncIterator[Any], context: Context) -> Any:
                return await inner_s(checked(requests, context), context)

            replaced["stream_stream"] = stream_stream_writer
        else:

            async def stream_unary(requests: AsyncIterator[Any], context: Context) -> Any:
                return await inner_s(checked(requests, context), context)

            replaced["stream_unary"] = stream_unary
    return handler._replace(**replaced)


def _message_name(handler: Handler, method: str) -> str:
    parse = handler.request_deserializer
    owner = getattr(parse, "__self__", None)
    return getattr(owner, "__name__", None) or method.rsplit("/", 1)[-1] + " request"


def guard_handlers(service: str, handlers: Mapping[str, Handler]) -> dict[str, Handler]:
    return {name: _guard_handler(h, _message_name(h, name)) for name, h in handlers.items()}


class _GuardedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose method handlers come out guarded (built once per method)."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._cache: dict[str, Handler | None] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method = handler_call_details.method
        if method not in self._cache:
            found = self._inner.service(handler_call_details)
            self._cache[method] = None if found is None else _guard_handler(found, _message_name(found, method))
        return self._cache[method]


class _GuardedServer:
    """Stands in for the server while services register; everything else passes through."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_GuardedGeneric(h) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Handler]) -> None:
        self._server.add_registered_method_handlers(service, guard_handlers(service, handlers))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def guard(server: grpc.aio.Server) -> grpc.aio.Server:
    """``server`` for ``add_*_to_server`` calls: the services they add answer malformed
    request messages with INVALID_ARGUMENT instead of UNKNOWN and a logged traceback."""
    return cast(grpc.aio.Server, _GuardedServer(server))
