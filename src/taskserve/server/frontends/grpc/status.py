"""The one place where server errors become gRPC statuses.

Known errors (TaskServeError) keep their message, stripped of server paths, memory
addresses and tracebacks and capped in length (``caller_safe``); anything else is a
bug: it is logged with its traceback and the caller gets INTERNAL with a generic message.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from taskserve.server.errors import Code, TaskServeError, caller_safe

log = logging.getLogger(__name__)

_STATUS: dict[Code, grpc.StatusCode] = {code: getattr(grpc.StatusCode, code.value) for code in Code}

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def grpc_status(err: TaskServeError) -> grpc.StatusCode:
    return _STATUS[err.code]


def describe(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status and caller-facing message for any exception."""
    if isinstance(err, TaskServeError):
        return grpc_status(err), caller_safe(err.message)
    log.error("unexpected error while handling a request", exc_info=err)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(err).__name__}); the server log has the details"


async def abort(context: grpc.aio.ServicerContext[Any, Any], err: BaseException) -> NoReturn:
    code, message = describe(err)
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def unary(
    handler: Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]:
    """Decorate a unary servicer method so every error leaves through ``describe``."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
        try:
            return await handler(self, request, context)
        except TaskServeError as err:
            await abort(context, err)
        except (grpc.aio.AbortError, grpc.aio.BaseError):
            raise  # already a status
        except Exception as err:
            await abort(context, err)

    return wrapper


def server_stream(
    handler: Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]]:
    """The same for response-streaming methods (async generators)."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Resp]:
        try:
            async for item in handler(self, request, context):
                yield item
        except TaskServeError as err:
            await abort(context, err)
        except (grpc.aio.AbortError, grpc.aio.BaseError):
            raise
        except Exception as err:
            await abort(context, err)

    return wrapper
